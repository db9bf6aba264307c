"""LoRA healing on SmolLM2 through the pipeline, at scale=fast (one LoRA step of 2 x 32 tokens):
the pruned-only evaluation is computed once and reused by the healed cell, the healed model is saved
merged and reloads with plain ``from_pretrained`` to the in-memory logits and the recorded perplexity,
and a resumed sweep retrains nothing."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.errors import NumericalError
from depthbench.evaluation.perplexity import heldout_windows, perplexity
from depthbench.experiments.pipeline import run
from depthbench.healing import lora as lora_module
from tests.helpers import compose
from tests.integration.conftest import needs_offline_packages

pytestmark = [pytest.mark.integration, needs_offline_packages]

COMMON = ("pruner=uidl", "scale=fast", "benchmark=none", "logger=none", "progress=false", "efficiency.enabled=false",
          "model.dtype=float32")


def test_healing_reuses_the_pruned_only_evaluation_saves_merged_and_resumes(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    cells = {"none": ("healing=none", "save_model=false"), "lora": ("healing=lora", "healing.lr=1e-3")}
    captured = {}
    heldout = compose(*COMMON).evaluation.perplexity  # the held-out windows' settings (the same in both cells)

    def keep_logits(model, tokenizer):
        captured["windows"] = heldout_windows(heldout, tokenizer)
        with torch.no_grad():
            captured["logits"] = model(**captured["windows"].batches[0], use_cache=False).logits

    trained = []
    real_heal = lora_module.heal
    monkeypatch.setattr(lora_module, "heal", lambda *a, **k: trained.append(1) or real_heal(*a, **k))
    records = {}
    for name, overrides in cells.items():
        cfg = compose(*COMMON, *overrides)
        records[name] = run(cfg, sweep / name, sweep_dir=sweep, after_prune=keep_logits if name == "lora" else None)
    assert not records["none"].get("resumed") and not records["lora"].get("resumed")
    none, lora = (json.loads((sweep / name / "result.json").read_text()) for name in ("none", "lora"))
    assert trained == [1]
    assert none["healing"] == {"method": "none"} and "healed" not in none["metrics"]
    # the pruned-only numbers: computed by the first cell, reused (not recomputed) by the healed one
    assert none["metrics"]["pruned_from_cache"] is False and lora["metrics"]["pruned_from_cache"] is True
    assert lora["metrics"]["pruned"] == none["metrics"]["pruned"]
    assert lora["metrics"]["fidelity"] == none["metrics"]["fidelity"]
    healing = lora["healing"]
    assert healing["method"] == "lora" and healing["steps"] == 1 and healing["tokens"] == 2 * 32
    assert len(healing["loss_curve"]) == 1 and healing["seconds"] > 0 and healing["text"]["shared_with_heldout"] == 0
    assert healing["config"]["lr"] == 1e-3 and healing["config"]["seed"] == 0
    assert lora["stages"]["heal"]["seconds"] > 0
    healed = lora["metrics"]["healed"]
    pruned_ppl = lora["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]
    assert healed["heldout_perplexity"]["perplexity"] != pruned_ppl and "kl_mean" in healed["fidelity"]
    # the saved model: merged (no LoRA weights), the pruned architecture, the in-memory logits
    model_dir = sweep / "lora" / "pruned_model"
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == lora["pruning"]["num_layers_after"]
    assert not any("lora" in key for key in reloaded.state_dict())
    with torch.no_grad():
        logits = reloaded(**captured["windows"].batches[0], use_cache=False).logits
    assert torch.equal(logits, captured["logits"])
    assert perplexity(reloaded, captured["windows"].batches, progress=False)["perplexity"] == pytest.approx(
        healed["heldout_perplexity"]["perplexity"], rel=1e-6)
    metadata = json.loads((model_dir / "pruning.json").read_text())
    assert metadata["healing"]["loss_curve"] == healing["loss_curve"]
    # resumed: nothing is retrained or rewritten
    mtime = (sweep / "lora" / "result.json").stat().st_mtime_ns
    again = run(compose(*COMMON, *cells["lora"]), sweep / "lora", sweep_dir=sweep)
    assert again["resumed"] and trained == [1]
    assert (sweep / "lora" / "result.json").stat().st_mtime_ns == mtime



def test_a_nan_loss_stops_the_run_and_saves_nothing(tmp_path, monkeypatch):
    real_loss = lora_module._batch_loss
    monkeypatch.setattr(lora_module, "_batch_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    out = tmp_path / "cell"
    with pytest.raises(NumericalError, match="healing loss is nan at step 1 of 1"):
        run(compose(*COMMON, "healing=lora"), out)
    assert not (out / "result.json").exists() and not (out / "pruned_model").exists()
    assert not list(out.glob(".*.tmp"))

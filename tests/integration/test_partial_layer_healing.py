"""Partial-layer healing on SmolLM2 through the pipeline, at scale=fast (3 steps of 2 x 32 tokens): one
cell of ``pruner=last_layers healing=partial_layers``. The record holds the pruned-only and the healed
metrics; the saved model is untied (SmolLM2 ties its head to the embedding), reloads with plain
``from_pretrained`` to the in-memory logits and the recorded healed perplexity, and every tensor outside
the head, the final norm and the last 3 kept layers equals the original model's (loaded separately)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.evaluation.perplexity import heldout_windows, perplexity
from depthbench.experiments.pipeline import run
from depthbench.modeling.loading import load_model
from depthbench.paths import run_paths
from tests.helpers import compose
from tests.integration.conftest import needs_offline_packages

pytestmark = [pytest.mark.integration, needs_offline_packages]

OVERRIDES = ("pruner=last_layers", "healing=partial_layers", "scale=fast", "benchmark=none", "logger=none",
             "progress=false", "efficiency.enabled=false", "model.dtype=float32", "healing.steps=3",
             "healing.warmup_steps=0", "healing.lr=1e-4", "healing.eval_every=1", "healing.val_windows=4")


def test_partial_layer_healing_trains_the_tail_and_saves_an_untied_model(tmp_path):
    cfg = compose(*OVERRIDES)
    captured = {}

    def keep_logits(model, tokenizer):
        captured["windows"] = heldout_windows(cfg.evaluation.perplexity, tokenizer)
        with torch.no_grad():
            captured["logits"] = model(**captured["windows"].batches[0], use_cache=False).logits

    record = run(cfg, tmp_path / "cell", after_prune=keep_logits)
    saved = json.loads((tmp_path / "cell" / "result.json").read_text())
    assert saved["healing"] == json.loads(json.dumps(record["healing"]))
    # SmolLM2: 30 layers, ratio 0.25 removes 8 (the last ones); the last 3 kept are original 19, 20, 21
    removed = saved["pruning"]["removed_layers"]
    assert removed == list(range(22, 30)) and saved["pruning"]["num_layers_after"] == 22
    h = saved["healing"]
    assert h["method"] == "partial_layers" and h["layers"] == 3
    assert h["trained_layers"] == [19, 20, 21] and h["trained_original_layers"] == [19, 20, 21]
    assert h["untied_embeddings"] is True and h["untie_added_parameters"] == 49152 * 576
    assert h["steps"] == 3 and h["tokens"] == 3 * 2 * 32 and len(h["loss_curve"]) == 3
    assert [v["step"] for v in h["validation_curve"]] == [0, 1, 2, 3]
    best = min(h["validation_curve"][1:], key=lambda v: v["loss"])
    assert h["select"] == "best" and h["selected_step"] == best["step"]
    assert h["text"]["validation"]["windows"] == 4 and h["text"]["shared_with_heldout"] == 0
    assert h["config"]["seed"] == 0 and h["config"]["warmup_steps_used"] == 0 and h["dense_copy_bytes"] == 0
    # both sets of metrics: the pruned-only ones and the healed ones
    pruned_ppl = saved["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]
    healed = saved["metrics"]["healed"]
    assert healed["heldout_perplexity"]["perplexity"] != pruned_ppl and "kl_mean" in healed["fidelity"]
    assert "kl_mean" in saved["metrics"]["fidelity"]
    # the saved model: untied, the pruned depth, the in-memory logits, the recorded healed perplexity
    model_dir = tmp_path / "cell" / "pruned_model"
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 22
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = reloaded(**captured["windows"].batches[0], use_cache=False).logits
    assert torch.equal(logits, captured["logits"])
    assert perplexity(reloaded, captured["windows"].batches, progress=False)["perplexity"] == pytest.approx(
        healed["heldout_perplexity"]["perplexity"], rel=1e-6)
    trainable = [p for n, p in reloaded.named_parameters()
                 if n.startswith(("lm_head.", "model.norm.", "model.layers.19.", "model.layers.20.",
                                  "model.layers.21."))]
    assert h["trainable_parameters"] == sum(p.numel() for p in trainable)
    # frozen: bit-identical to the original model (embedding and layers 0..18); trained: changed
    original = load_model(cfg.model, device="cpu", models_dir=run_paths(cfg).models_dir).model.float()
    dense = original.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if name == "lm_head.weight":
            assert not torch.equal(tensor, dense["model.embed_tokens.weight"])
        elif name.startswith(("model.norm.", "model.layers.19.", "model.layers.20.", "model.layers.21.")):
            assert not torch.equal(tensor, dense[name]), name
        else:
            assert torch.equal(tensor, dense[name]), name
    metadata = json.loads((model_dir / "pruning.json").read_text())
    assert metadata["healing"]["validation_curve"] == h["validation_curve"]

"""Partial-layer healing (healing=partial_layers): the trainable set, frozen tensors, untying, checkpoint
selection, the validation split and the options.

References are independent of `depthbench.healing.partial_layers`:
- the trainable-parameter counts of a pruned Llama-3.1-8B are the spec's test vectors
  (METHODS-2026 §10 (c)), on a meta-device model pruned through the adapter;
- which tensors may change is written out here by name (Llama's module names), and every other tensor
  is compared bit for bit with a copy taken before training;
- the validation loss is recomputed here in float64 from the model's logits; the tensors of the best
  validation step are copied by a callback of the test at each evaluation;
- a healed model saved and reloaded with plain ``from_pretrained`` gives the in-memory logits.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from depthbench.errors import ConfigError
from depthbench.healing.data import HealingText, healing_text
from depthbench.healing.partial_layers import heal, trainable_set
from depthbench.healing.settings import PartialLayerSettings, check_healing, healing_settings
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from tests.helpers import build_tiny_model, compose, logits, random_batches, tiny_llama_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _settings(**overrides) -> PartialLayerSettings:
    values = {"name": "partial_layers", "layers": 2, "lr": 1e-2, "warmup_steps": 0, "steps": 3, "batch_size": 2,
              "seq_len": 16, "val_windows": 2, "eval_every": 1, "select": "last", "seed": 0}
    values.update(overrides)
    return healing_settings(OmegaConf.create(values))


def _text(steps=3, seed=5, validation_seed=9) -> HealingText:
    return HealingText(batches=random_batches(n_batches=steps, batch_size=2, seq_len=16, seed=seed, ragged=False),
                       description="random tokens", documents=1, heldout_documents_checked=None,
                       validation=random_batches(n_batches=1, batch_size=2, seq_len=16, seed=validation_seed))


def _tiny(tie=True, num_layers=4, dtype=torch.float32):
    return build_tiny_model(tiny_llama_config(num_layers=num_layers, tie=tie), dtype=dtype)


# ------------------------------------------------------------------------------- the spec's test vectors
def _llama31_8b_pruned():
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_layers(range(24, 32))  # reverse order, R = 8: layers [L - R, L)
    return model, adapter


@pytest.mark.parametrize("k, expected", [(3, 1_179_676_672), (1, 743_452_672), (0, 525_340_672)])
def test_trainable_parameters_of_a_pruned_llama_3_1_8b_are_the_spec_vectors(k, expected):
    model, adapter = _llama31_8b_pruned()
    chosen = trainable_set(adapter, k)
    assert chosen.count == expected
    assert chosen.layers == list(range(24 - k, 24))
    assert set(chosen.parameters) == ({"lm_head.weight", "model.norm.weight"}
                                      | {n for n, _ in model.named_parameters()
                                         if any(n.startswith(f"model.layers.{i}.") for i in range(24 - k, 24))})


def test_more_layers_than_the_pruned_model_has_is_refused():
    _, adapter = _llama31_8b_pruned()
    trainable_set(adapter, 24)
    with pytest.raises(ConfigError, match="healing.layers=25 but the pruned model has 24 layers"):
        trainable_set(adapter, 25)


# ----------------------------------------------------------------------------------- what is trained
def _trained_names(state_dict, layers: range) -> set[str]:
    """Written out: Llama's head, final norm and the named layers' tensors."""
    return {n for n in state_dict if n.startswith(("lm_head.", "model.norm."))
            or any(n.startswith(f"model.layers.{i}.") for i in layers)}


@pytest.mark.parametrize("tie", [True, False])
def test_frozen_tensors_are_bit_identical_and_the_trained_ones_change(tie):
    model = _tiny(tie=tie)
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_layers([1])  # pruned: 3 layers, original 0, 2, 3
    before = {n: t.clone() for n, t in model.state_dict().items()}
    report = heal(model, adapter, _text(), _settings(layers=2), removed_layers=[1], progress=False)
    after = model.state_dict()
    assert set(after) == set(before)
    trained = _trained_names(before, range(1, 3))
    assert "model.embed_tokens.weight" not in trained and "lm_head.weight" in trained
    for name in before:
        if name in trained:
            assert not torch.equal(after[name], before[name]), name
        else:
            assert torch.equal(after[name], before[name]), name
    assert report["trained_layers"] == [1, 2] and report["trained_original_layers"] == [2, 3]
    assert report["trainable_parameters"] == sum(before[n].numel() for n in trained)
    assert sorted(report["trainable_tensors"]) == sorted(trained)
    assert report["untied_embeddings"] is tie
    assert report["untie_added_parameters"] == (101 * 32 if tie else 0)  # V x d
    # untied for good: the head has its own tensor and the config says so
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert all(p.requires_grad for p in model.parameters()) and not model.training  # as before healing


def test_zero_learning_rate_reproduces_the_untrained_model():
    model = _tiny()
    batch = random_batches(n_batches=1, seq_len=12, seed=3)[0]
    untrained = logits(model, batch)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    heal(model, adapter_for(model), _text(), _settings(lr=0.0, select="best"), progress=False)
    assert torch.equal(logits(model, batch), untrained)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_healed_untied_model_reloads_with_plain_from_pretrained(tmp_path):
    model = _tiny(tie=True)
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_layers([2])
    heal(model, adapter, _text(), _settings(), progress=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 3 and reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
    batch = random_batches(n_batches=1, seq_len=12)[0]
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


# ----------------------------------------------------------------------------------- checkpoint choice
def _validation_ce(model, batches) -> float:
    """float64 cross-entropy over the predicted real tokens, from the model's own logits."""
    total, count = 0.0, 0
    for b in batches:
        predicted = logits(model, b)[:, :-1].double()
        keep = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
        total += float(F.cross_entropy(predicted[keep], b["input_ids"][:, 1:][keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def _run_with_snapshots(select: str, lr: float, steps: int = 6):
    model = _tiny(tie=False)
    adapter = adapter_for(model)
    text = _text(steps=steps)
    text.validation = [text.batches[0]]  # step 1 trains on the validation window; later steps on others
    snapshots, losses = {}, {}

    def snapshot(step, loss):
        losses[step] = _validation_ce(model, text.validation)
        snapshots[step] = {n: t.clone() for n, t in model.state_dict().items()}

    report = heal(model, adapter, text, _settings(lr=lr, steps=steps, select=select), progress=False,
                  on_evaluation=snapshot)
    return model, report, snapshots, losses


def test_select_best_restores_the_best_validation_step():
    model, report, snapshots, losses = _run_with_snapshots("best", lr=0.5)
    steps = sorted(losses)
    assert steps == list(range(0, 7)) and [v["step"] for v in report["validation_curve"]] == steps
    for entry in report["validation_curve"]:  # the recorded curve is the validation cross-entropy
        assert entry["loss"] == pytest.approx(losses[entry["step"]], rel=1e-5)
    best = min(steps[1:], key=lambda s: (losses[s], s))  # step 0 (untrained) is not a candidate
    assert best < steps[-1] and losses[steps[-1]] > losses[best]  # the case: the last step is worse
    assert report["selected_step"] == best and report["select"] == "best"
    final = model.state_dict()
    assert all(torch.equal(final[n], snapshots[best][n]) for n in final)
    assert not all(torch.equal(final[n], snapshots[steps[-1]][n]) for n in final)


def test_select_last_keeps_the_final_weights():
    model, report, snapshots, losses = _run_with_snapshots("last", lr=0.5)
    assert report["selected_step"] == 6
    final = model.state_dict()
    assert all(torch.equal(final[n], snapshots[6][n]) for n in final)


def test_validation_every_k_steps_and_after_the_last():
    model = _tiny()
    report = heal(model, adapter_for(model), _text(steps=5), _settings(steps=5, eval_every=2), progress=False)
    assert [v["step"] for v in report["validation_curve"]] == [0, 2, 4, 5]
    assert report["steps"] == 5 and len(report["loss_curve"]) == 5


def test_warmup_and_linear_decay_follow_the_reference_schedule(monkeypatch):
    """lr at step s (1-based) = peak * (s-1)/W during warm-up, then peak * (T-(s-1))/(T-W): recorded from
    the optimiser here and compared with the formula."""
    seen = []
    real_step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    model = _tiny()
    T, W, peak = 6, 2, 1e-3
    heal(model, adapter_for(model), _text(steps=T), _settings(steps=T, warmup_steps=W, lr=peak), progress=False)
    expected = [peak * s / W if s < W else peak * (T - s) / (T - W) for s in range(T)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-18)
    # warm-up longer than the budget: capped at steps - 1 so training runs at lr > 0 (scale=fast)
    assert _settings(steps=1, warmup_steps=100).warmup_steps_used == 0


def test_bfloat16_training_keeps_float32_masters_so_small_updates_accumulate():
    """At lr 1e-5 one AdamW update (about 1e-5) is below half of bfloat16's spacing for weights above
    about 5e-3 in magnitude (4 in 5 of the head's, std 0.02), so stepping the bfloat16 tensors directly
    would change only the smallest (15% of them here, measured without masters); with float32 masters the
    updates add up (47%)."""
    model = _tiny(tie=False, dtype=torch.bfloat16)
    head, embed = model.lm_head.weight.detach().clone(), model.model.embed_tokens.weight.detach().clone()
    heal(model, adapter_for(model), _text(steps=40), _settings(steps=40, lr=1e-5, layers=0), progress=False)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert (model.lm_head.weight != head).float().mean() > 0.35
    assert torch.equal(model.model.embed_tokens.weight, embed)


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("override, message", [
    ({"layers": -1}, "healing.layers=-1"),
    ({"select": "worst"}, "healing.select='worst'; allowed: best, last"),
    ({"eval_every": 0}, "healing.eval_every=0"),
    ({"val_windows": 0}, "healing.val_windows=0"),
    ({"lr": -1.0}, "healing.lr=-1.0"),
    ({"steps": None, "tokens": None}, "both null"),
    ({"rank": 8}, "unknown healing option.*rank.*healing=partial_layers"),
])
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        _settings(**override)


def test_too_many_layers_fail_from_config_json_before_weights(tmp_path):
    tiny_llama_config(num_layers=6).save_pretrained(tmp_path)  # config.json only: no weights to read
    cfg = OmegaConf.create({"model": {"name_or_path": str(tmp_path)},
                            "healing": {"name": "partial_layers", "layers": 5}})
    assert check_healing(cfg).layers == 5
    cfg.healing.layers = 6
    with pytest.raises(ConfigError, match="healing.layers=6 but the model has 6 layers"):
        check_healing(cfg)


def test_the_entry_composes_with_the_reference_defaults_and_the_fast_scale():
    s = healing_settings(compose("healing=partial_layers", "seed=4").healing)
    assert isinstance(s, PartialLayerSettings)
    assert (s.layers, s.lr, s.warmup_steps, s.weight_decay, s.max_grad_norm, s.select) == (3, 1e-5, 100, 0.0, 1.0,
                                                                                            "best")
    assert (s.num_steps, s.batch_size, s.seq_len, s.seed, s.warmup_steps_used) == (250, 4, 256, 4, 100)
    fast = healing_settings(compose("healing=partial_layers", "scale=fast").healing)
    assert (fast.num_steps, fast.batch_size, fast.seq_len, fast.warmup_steps_used) == (1, 2, 32, 0)


# --------------------------------------------------------------------------------------- the text
class DocumentTokenizer:
    """Every word of document i is token 3 + i, so a window's tokens name the documents it came from."""

    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text, truncation=False, max_length=None):
        ids = [3 + int(w[1:].split("w")[0]) for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_the_validation_split_takes_whole_documents_never_trained_on(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"d{i}w{j}" for j in range(20 + i % 7))}) + "\n"
                            for i in range(60)), encoding="utf-8")
    local = OmegaConf.create({"source": "local", "path": str(path)})
    settings = _settings(steps=5, batch_size=3, seq_len=16, val_windows=4)
    text = healing_text(local, DocumentTokenizer(), settings)

    def documents(batches):
        return {int(t) - 3 for b in batches for t in b["input_ids"][b["attention_mask"].bool()] if int(t) > 2}

    assert len(text.batches) == 5 and all(b["input_ids"].shape == (3, 16) for b in text.batches)
    assert len(text.validation) == 2 and sum(b["input_ids"].shape[0] for b in text.validation) == 4
    assert all(int(b["attention_mask"].sum()) == b["attention_mask"].numel() for b in text.validation)
    held, trained = documents(text.validation), documents(text.batches)
    assert held and trained and not held & trained
    info = text.to_dict()["validation"]
    assert info["windows"] == 4 and info["tokens"] == 64 and info["documents"] >= len(held)
    assert text.documents + info["documents"] == 60
    again = healing_text(local, DocumentTokenizer(), settings)  # the same seed: the same split
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again.validation, text.validation))
    with pytest.raises(ConfigError, match="healing.val_windows=1000"):
        healing_text(local, DocumentTokenizer(), _settings(val_windows=1000))

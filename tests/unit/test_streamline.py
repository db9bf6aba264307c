"""LLM-Streamline: scores, the trained replacement, and the saved model, against independent references."""

import copy

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from depthbench.pruners.methods.llm_streamline import warmup_cosine
from tests.helpers import build_tiny_model, random_batches, tiny_llama_config
from tests.reference import residual_states_np


def real_mask(batches):
    width = max(b["input_ids"].shape[1] for b in batches)
    return np.concatenate([np.pad(b["attention_mask"].numpy(), ((0, 0), (0, width - b["input_ids"].shape[1])))
                           for b in batches]).astype(bool)


@pytest.mark.parametrize("n", [2, 5])
def test_scores_and_choice_equal_brute_force(n):
    L = 6
    model = build_tiny_model(tiny_llama_config(num_layers=L), seed=n).to(torch.float64)
    batches = random_batches(n_batches=3, seed=n)
    hs, _ = residual_states_np(model, batches)  # h_L before the final norm
    mask = real_mask(batches)

    def mean_cos(a, b):
        a, b = a[mask], b[mask]
        return float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))

    expected = [mean_cos(hs[j], hs[j + n + 1]) for j in range(L - n)]
    j = int(np.argmax(expected))
    pruner = build_pruner("llm_streamline", {"max_steps": 1})
    from depthbench.calibration.statistics import collect
    adapter = adapter_for(model)
    selection = pruner.select(collect(adapter, batches, pruner.statistics(adapter, n), progress=False),
                              adapter, n, None)
    np.testing.assert_allclose(selection.scores["values"], expected, rtol=1e-10)
    assert selection.scores["starts"] == list(range(L - n))
    assert selection.scores["replaced_range"] == [j, j + n + 1]
    assert selection.removed_layers == list(range(j + 1, j + n + 1))


def test_layer_forward_reproduces_the_model(tiny_llama):
    adapter = adapter_for(tiny_llama)
    batch = random_batches(n_batches=1, seed=4)[0]
    with torch.no_grad():
        states = tiny_llama(**batch, output_hidden_states=True, use_cache=False).hidden_states
        h = states[0]
        real = batch["attention_mask"].bool()
        for k in range(adapter.num_layers - 1):
            h = adapter.layer_forward(adapter.layer(k), h, batch["attention_mask"])
            torch.testing.assert_close(h[real], states[k + 1][real], rtol=1e-5, atol=1e-6)


def capture_inputs(model, batches):
    """Per batch: the input of every decoder layer and of the final norm (h_0 .. h_L), via pre-hooks."""
    out = []
    for b in batches:
        states = []
        modules = list(model.model.layers) + [model.model.norm]
        handles = [m.register_forward_pre_hook(lambda mod, args, kw, states=states: states.append(
            (args[0] if args else kw["hidden_states"]).detach()), with_kwargs=True) for m in modules]
        try:
            with torch.no_grad():
                model(**b, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        out.append(states)
    return out


@pytest.mark.parametrize("replacement", ["layer", "ffn"])
def test_training_reduces_mse_and_saved_model_reloads(replacement, tmp_path):
    from transformers import AutoModelForCausalLM

    L, n = 6, 2
    model = build_tiny_model(tiny_llama_config(num_layers=L), seed=11)
    original = copy.deepcopy(model)
    batches = random_batches(n_batches=4, batch_size=4, seed=11)
    # every sequence trained on, last state kept: the training itself is under test here
    options = {"replacement": replacement, "lr": 3e-3, "min_lr": 1e-4, "max_steps": 40, "warmup_steps": 2,
               "holdout": 0.0, "keep_best": False,
               "batch_size": 4, "spill_dir": str(tmp_path)}
    result = build_pruner("llm_streamline", options).prune(adapter_for(model), CalibrationData(batches, 16), n,
                                                           progress=False)
    assert [p.name for p in tmp_path.iterdir()] == []  # the spill files are gone
    info = result.replacement
    assert info["precision"] == "float32"  # auto on a float32 model
    j, end = info["replaced_range"]
    assert end == j + n + 1 and result.removed_layers == list(range(j + 1, end))
    assert model.config.num_hidden_layers == L - n
    per_layer = sum(p.numel() for p in original.model.layers[0].parameters())
    if replacement == "layer":
        assert info["new_parameters"] == per_layer
    else:
        ffn = original.model.layers[0].mlp, original.model.layers[0].post_attention_layernorm
        assert info["new_parameters"] == sum(p.numel() for m in ffn for p in m.parameters())
        assert torch.count_nonzero(model.model.layers[j].self_attn.o_proj.weight) == 0

    # independent MSE: the pruned model's output of the new module against the original h_{j+n+1},
    # compared with what layer j alone gave before
    before, after = capture_inputs(original, batches), capture_inputs(model, batches)
    sq_before = sq_after = count = 0.0
    for b, hb, ha in zip(batches, before, after):
        real = b["attention_mask"].bool()
        target = hb[end][real].double()
        sq_before += float(((hb[j + 1][real].double() - target) ** 2).sum())
        sq_after += float(((ha[j + 1][real].double() - target) ** 2).sum())
        count += target.numel()
    if replacement == "layer":  # the module starts as a copy of layer j
        np.testing.assert_allclose(info["mse_before_training"], sq_before / count, rtol=1e-4)
    np.testing.assert_allclose(info["mse_after_training"], sq_after / count, rtol=1e-4)
    assert info["mse_after_training"] < info["mse_before_training"]
    assert sq_after < sq_before

    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_hidden_layers == L - n
    with torch.no_grad():
        for b in batches[:2]:
            torch.testing.assert_close(reloaded(**b).logits, model(**b).logits, rtol=0, atol=1e-6)
    prompt = batches[0]["input_ids"][:1, :6]
    cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached) and cached.shape[1] == 12


def test_bfloat16_model_trains_in_mixed_precision():
    """auto on a bfloat16 model = bfloat16 autocast: the arithmetic really changes (first-step loss),
    the training is the same one (close to float32 training), and the reported MSE after training is
    the one of the placed module, recomputed independently in float64."""
    L, n = 6, 2
    model = build_tiny_model(tiny_llama_config(num_layers=L), seed=12, dtype=torch.bfloat16)
    batches = random_batches(n_batches=4, batch_size=4, seed=12)
    options = {"lr": 3e-3, "min_lr": 1e-4, "max_steps": 30, "warmup_steps": 2, "batch_size": 4, "holdout": 0.0,
               "keep_best": False}
    runs = {}
    for precision in ("auto", "float32"):
        pruned = copy.deepcopy(model)
        result = build_pruner("llm_streamline", {**options, "precision": precision}).prune(
            adapter_for(pruned), CalibrationData(batches, 16), n, progress=False)
        runs[precision] = pruned, result.replacement
    mixed, full = runs["auto"][1], runs["float32"][1]
    assert (mixed["precision"], full["precision"]) == ("bf16-mixed", "float32")
    assert mixed["replaced_range"] == full["replaced_range"]
    assert mixed["loss_first_step"] != full["loss_first_step"]
    np.testing.assert_allclose(mixed["loss_first_step"], full["loss_first_step"], rtol=2e-2)
    np.testing.assert_allclose(mixed["mse_after_training"], full["mse_after_training"], rtol=5e-2)
    assert mixed["mse_after_training"] < 0.9 * mixed["mse_before_training"]

    j, end = mixed["replaced_range"]
    pruned = runs["auto"][0]
    assert pruned.model.layers[j].mlp.down_proj.weight.dtype == torch.bfloat16
    before, after = capture_inputs(model, batches), capture_inputs(pruned, batches)
    sq = count = 0.0
    for b, hb, ha in zip(batches, before, after):
        real = b["attention_mask"].bool()
        sq += float(((ha[j + 1][real].double() - hb[end][real].double()) ** 2).sum())
        count += hb[end][real].numel()
    np.testing.assert_allclose(mixed["mse_after_training"], sq / count, rtol=2e-2)


def test_a_device_without_bfloat16_autocast_is_refused_before_calibration(monkeypatch):
    """As torch does on a CUDA device without bfloat16: the autocast context raises on entry."""
    import depthbench.pruners.methods.llm_streamline as streamline

    class NoBf16Autocast:
        def __init__(self, device_type, dtype):
            raise RuntimeError("Current CUDA Device does not support bfloat16. Please switch dtype to float16.")

    monkeypatch.setattr(streamline.torch, "autocast", NoBf16Autocast)
    model = build_tiny_model(tiny_llama_config(num_layers=5), seed=1, dtype=torch.bfloat16)
    batches = random_batches(n_batches=2, seed=1)
    pruner, gathered = build_pruner("llm_streamline", {"max_steps": 1}), []
    from depthbench.calibration.service import CalibrationService

    with monkeypatch.context() as spy, pytest.raises(
            ConfigError, match=r"precision='auto' trains with bfloat16 autocast, which cpu does not support "
                               r"\(Current CUDA Device does not support bfloat16"
                               r".*use pruner.options.precision=float32"):
        spy.setattr(CalibrationService, "original", lambda *a, **k: gathered.append(a))
        pruner.prune(adapter_for(model), CalibrationData(batches, 16), 1, progress=False)
    assert gathered == []  # refused before any calibration pass
    # float32 training needs no autocast: the same model prunes
    build_pruner("llm_streamline", {"max_steps": 1, "precision": "float32"}).prune(
        adapter_for(model), CalibrationData(batches, 16), 1, progress=False)


def test_ffn_replacement_is_residual_mlp(tmp_path):
    model = build_tiny_model(tiny_llama_config(num_layers=5), seed=3)
    batches = random_batches(n_batches=2, seed=3)
    result = build_pruner("llm_streamline", {"replacement": "ffn", "max_steps": 3, "lr": 1e-3}).prune(
        adapter_for(model), CalibrationData(batches, 16), 1, progress=False)
    j = result.replacement["replaced_range"][0]
    layer = model.model.layers[j]
    h = torch.randn(2, 7, model.config.hidden_size)
    with torch.no_grad():
        got = adapter_for(model).layer_forward(layer, h, torch.ones(2, 7, dtype=torch.long))
        want = h + layer.mlp(layer.post_attention_layernorm(h))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_trains_and_leaves_the_rest_frozen(dtype):
    model = build_tiny_model(tiny_llama_config(num_layers=5), seed=2, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = random_batches(n_batches=2, seed=2)
    result = build_pruner("llm_streamline", {"loss": "lm", "max_steps": 3}).prune(
        adapter_for(model), CalibrationData(batches, 16), 1, progress=False)
    j = result.replacement["replaced_range"][0]
    assert np.isfinite(result.replacement["loss_last_step"])
    assert result.replacement["precision"] == ("bf16-mixed" if dtype == torch.bfloat16 else "float32")
    after = model.state_dict()
    kept = [k for k in range(5) if k not in result.removed_layers and k != j]
    for new, old in enumerate(k for k in range(5) if k not in result.removed_layers):
        if old in kept:
            for name, v in model.model.layers[new].state_dict().items():
                assert torch.equal(v, before[f"model.layers.{old}.{name}"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert all(p.requires_grad for p in model.parameters())  # restored after training


def test_schedule_warms_up_then_decays_to_min_lr():
    lrs = [warmup_cosine(s, 20, 4, 2e-4, 5e-5) for s in range(20)]
    np.testing.assert_allclose(lrs[:4], [5e-5, 1e-4, 1.5e-4, 2e-4])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] >= 5e-5
    np.testing.assert_allclose(warmup_cosine(20, 20, 4, 2e-4, 5e-5), 5e-5)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="replacement='attention'"):
        build_pruner("llm_streamline", {"replacement": "attention"})
    with pytest.raises(ConfigError, match="precision='fp16'; allowed: auto, float32, bf16-mixed"):
        build_pruner("llm_streamline", {"precision": "fp16"})
    with pytest.raises(ConfigError, match="max_steps=0"):
        build_pruner("llm_streamline", {"max_steps": 0})


@pytest.mark.parametrize("method, options", [
    ("llm_streamline", {"max_steps": 6, "batch_size": 2, "lr": 3e-3, "holdout": 0.25}),
    ("replaceme_cosine", {"epochs": 2, "batch_size": 16, "lr": 1e-2}),
])
def test_the_seed_changes_a_trained_method_and_the_same_seed_reproduces_it(method, options):
    """The run's ``seed`` reaches a trained method as ``pruner.options.seed`` (tests/unit/test_configs.py): another
    seed shuffles and holds out differently, so the fitted model differs; the same seed reproduces it bit for bit."""
    batches = random_batches(n_batches=4, batch_size=4, seed=5)

    def pruned(seed):
        model = build_tiny_model(tiny_llama_config(num_layers=6), seed=5)
        build_pruner(method, {**options, "seed": seed}).prune(adapter_for(model), CalibrationData(batches, 16), 2,
                                                               progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first, again, other = pruned(0), pruned(0), pruned(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)

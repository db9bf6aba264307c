"""ReplaceMe on Gemma-2/3 with ``norm_fold: linear``: T as an explicit Linear after the post-FFN norm.

Against independent computations: the pruned model against the original with T applied to the norm's
output by a float64 hook; the saved directory reloaded by `load_pruned` (identical logits, cached
generation) while plain ``from_pretrained`` fails loudly; the adapter's composition of transforms.
"""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.calibration.batches import CalibrationData
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.saving import CUSTOM_MODULES_FILE, METADATA_FILE, load_pruned, save_pruned
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_llama64, logits, random_batches
from tests.families import family_config

GEMMA = ["gemma2", "gemma3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(family):
    """Built in its dtype as ``from_pretrained`` builds it (``.to(float64)`` after a float32 build would
    keep Gemma-3's non-persistent ``embed_scale`` rounded to float32, which no reload reproduces).
    Gemma-2's eager sliding attention gives NaN in float64 on these tiny models: float32 there."""
    torch.manual_seed(0)
    dtype = torch.float32 if family == "gemma2" else torch.float64
    return AutoModelForCausalLM.from_config(family_config(family), dtype=dtype).eval()


def _transform(family, model, calibration):
    """(selection, T) from the pruner's own stages on an untouched copy (what the fold must apply)."""
    pruner = build_pruner("replaceme_ls")
    adapter = adapter_for(copy.deepcopy(model))
    with pruner.service(adapter, calibration, progress=False) as service:
        stats = service.original(pruner.statistics(adapter, 2))
        selection = pruner.select(stats, adapter, 2, service)
        ((block, T, _),) = pruner.fit(adapter, selection, service)
    return selection, block, T


@pytest.mark.parametrize("family", GEMMA)
def test_linear_route_equals_explicit_float64_computation(family):
    """Residual gets norm_output @ T: the reference applies T to the original norm's output in float64."""
    model = _model(family)
    calibration = CalibrationData(random_batches(n_batches=2), 16)
    selection, block, T = _transform(family, model, calibration)
    reference, uidl = copy.deepcopy(model), copy.deepcopy(model)
    reference.model.layers[block.start - 1].post_feedforward_layernorm.register_forward_hook(
        lambda mod, args, out: (out.to(torch.float64) @ T).to(out.dtype))
    ModelSurgery(adapter_for(reference)).remove_layers(selection.removed_layers)
    ModelSurgery(adapter_for(uidl)).remove_layers(selection.removed_layers)

    result = build_pruner("replaceme_ls").prune(adapter_for(model), calibration, 2, progress=False)
    assert result.removed_layers == selection.removed_layers
    kept = block.start - 1  # before the block: same index after removal
    linear = model.model.layers[kept].post_feedforward_layernorm.linear
    assert linear.weight.dtype == model.dtype and linear.bias is None
    batch = random_batches(n_batches=1, seq_len=12)[0]
    want = logits(reference, batch)
    assert not torch.allclose(want, logits(uidl, batch), atol=1e-3)  # T changed something
    torch.testing.assert_close(logits(model, batch), want, rtol=1e-5, atol=1e-5)  # Gemma's norm runs in float32


@pytest.mark.parametrize("method", ["replaceme_ls", "replaceme_cosine"])
@pytest.mark.parametrize("family", GEMMA)
def test_linear_route_saves_says_custom_code_and_reloads_with_the_loader(family, method, tmp_path):
    model = _model(family)
    batches = random_batches(n_batches=2)
    options = {"epochs": 1} if method == "replaceme_cosine" else {}
    result = build_pruner(method, options).prune(adapter_for(model), CalibrationData(batches, 16), 2, progress=False)
    d = model.config.hidden_size
    info = result.replacement
    assert info["custom_code_needed"] is True and "load_pruned" in info["loading"]
    assert info["new_parameters"] == d * d
    assert result.parameters_after["total"] == result.parameters_before["total"] - 2 * result.parameters_before[
        "per_layer"] + d * d
    (fit,) = info["blocks"]
    assert "explicit linear" in fit["applied"]

    save_pruned(model, None, tmp_path / "pruned", result.to_dict())
    written = json.loads((tmp_path / "pruned" / METADATA_FILE).read_text())
    assert written["replacement"]["custom_code_needed"] is True
    assert written["custom_modules"]["mlp_output_linear_layers"] == [fit["folded_into_layer"]]
    assert json.loads((tmp_path / "pruned" / CUSTOM_MODULES_FILE).read_text())["mlp_output_linear_layers"] == [
        fit["folded_into_layer"]]
    with pytest.raises(OSError, match="no file named model.safetensors"):  # loudly, never with T dropped
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")

    reloaded = load_pruned(tmp_path / "pruned")
    assert type(reloaded) is type(model) and reloaded.dtype == model.dtype and not reloaded.training
    assert ModelSurgery(adapter_for(reloaded)).mlp_output_linear_layers() == [fit["folded_into_layer"]]
    batch = batches[0]
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)
    prompt = batch["input_ids"][:1, :6]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = reloaded.generate(prompt, use_cache=True, **kwargs)
    assert with_cache.shape[1] == 12
    assert torch.equal(with_cache, reloaded.generate(prompt, use_cache=False, **kwargs))
    assert torch.equal(with_cache, model.generate(prompt, use_cache=True, **kwargs))


@pytest.mark.parametrize("family", GEMMA)
def test_transforms_compose_into_an_inserted_linear(family):
    """A second transform (full, then diagonal) on a layer with a linear goes into it: M T1 T2 D."""
    model, k = _model(family), 2
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    T1, T2 = (torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
              for _ in range(2))
    D = torch.diag(1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64))
    explicit = copy.deepcopy(model)
    explicit.model.layers[k].post_feedforward_layernorm.register_forward_hook(
        lambda mod, args, out: (out.to(torch.float64) @ T1 @ T2 @ D).to(out.dtype))
    surgery = ModelSurgery(adapter_for(model))
    surgery.insert_mlp_output_linear(k, T1)
    surgery.fold_into_mlp_output(k, T2)  # full T: composes into the existing linear (exact)
    surgery.fold_into_mlp_output(k, D)  # diagonal: into the linear, not the norm's gain (which would be M D T)
    assert surgery.mlp_output_linear_layers() == [k]
    batch = random_batches(n_batches=1)[0]
    torch.testing.assert_close(logits(model, batch), logits(explicit, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["replaceme_ls", "replaceme_cosine"])
def test_norm_fold_value_is_checked(method):
    with pytest.raises(ConfigError, match=rf"^{method} norm_fold='linaer'; allowed: linear, through_norm$"):
        build_pruner(method, {"norm_fold": "linaer"})


def test_norm_fold_is_irrelevant_without_a_norm_after_the_mlp(tmp_path):
    """On Llama the fold into down_proj is exact: both values give the same model and no custom code."""
    batches = random_batches(n_batches=2)
    models = {}
    for value in ("linear", "through_norm"):
        model = build_tiny_llama64()
        result = build_pruner("replaceme_ls", {"norm_fold": value}).prune(adapter_for(model),
                                                                          CalibrationData(batches, 16), 2,
                                                                          progress=False)
        assert result.replacement["custom_code_needed"] is False and result.replacement["new_parameters"] == 0
        models[value] = model
    for key, value in models["linear"].state_dict().items():
        assert torch.equal(value, models["through_norm"].state_dict()[key]), key
    save_pruned(models["linear"], None, tmp_path / "plain", {})
    assert not (tmp_path / "plain" / CUSTOM_MODULES_FILE).exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "plain")  # plain directory, plain loader


def _pruned_and_saved(family, directory):
    model = _model(family)
    result = build_pruner("replaceme_ls").prune(adapter_for(model), CalibrationData(random_batches(n_batches=2), 16),
                                                2, progress=False)
    save_pruned(model, None, directory, result.to_dict())
    return model


def _rewrite_weights(directory, change):
    """Apply ``change`` to the saved state dict (a test's deliberate corruption) and write it back."""
    from safetensors.torch import load_file, save_file

    (path,) = (directory / "depthbench_weights").glob("*.safetensors")
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop(next(k for k in s if k.endswith("layers.1.mlp.up_proj.weight"))), r"missing \['model.layers.1"),
    (lambda s: s.update({"model.layers.1.extra.weight": torch.zeros(2)}), r"unexpected \['model.layers.1.extra"),
    (lambda s: s.pop(next(k for k in s if k.endswith("post_feedforward_layernorm.linear.weight"))),
     r"missing \[.*post_feedforward_layernorm.linear.weight"),
    (lambda s: s.update({k: v[:, :-1].contiguous() for k, v in s.items()
                         if k.endswith("layers.0.mlp.down_proj.weight")}),
     r"down_proj.weight has shape \(32, 63\); the architecture expects \(32, 64\)"),
])
def test_loader_refuses_weights_that_do_not_match(corrupt, message, tmp_path):
    _pruned_and_saved("gemma2", tmp_path / "pruned")
    _rewrite_weights(tmp_path / "pruned", corrupt)
    with pytest.raises(RuntimeError, match=message):
        load_pruned(tmp_path / "pruned")


@pytest.mark.parametrize("device_map", [None, "auto", "cpu", {"": "cpu"}])
def test_loader_places_and_casts_as_asked(device_map, tmp_path):
    """Loaded in another dtype (bfloat16) and through accelerate's dispatch: every parameter is the
    in-memory model's cast to bfloat16, and the logits agree to bfloat16 precision (not exactly:
    ``model.to(bfloat16)`` also rounds the rotary frequencies, which a model built in bfloat16 keeps
    in float32)."""
    model = _pruned_and_saved("gemma2", tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned", dtype=torch.bfloat16, device_map=device_map)
    assert reloaded.dtype == torch.bfloat16 and not reloaded.training
    want = dict(model.named_parameters())
    got = dict(reloaded.named_parameters())
    assert got.keys() == want.keys() and any(".linear." in k for k in got)
    for name, p in got.items():
        assert p.device.type == "cpu" and torch.equal(p, want[name].to(torch.bfloat16)), name
    batch = random_batches(n_batches=1)[0]
    torch.testing.assert_close(logits(reloaded, batch).float(), logits(model, batch), rtol=0, atol=3e-2)


def test_loader_names_a_device_map_it_cannot_use(tmp_path, monkeypatch):
    import depthbench.modeling.saving

    _pruned_and_saved("gemma2", tmp_path / "pruned")
    streamed = []
    monkeypatch.setattr(depthbench.modeling.saving, "_stream_weights", lambda *a: streamed.append(a))
    with pytest.raises(ValueError, match=r"device_map=3; allowed: 'auto', a device name"):
        load_pruned(tmp_path / "pruned", device_map=3)
    assert streamed == []  # refused before any weight is read

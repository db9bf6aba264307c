"""Every supported family on a tiny randomly initialised model built from its transformers config.

Per family: the adapter's single-layer forward and M_k hook point against the model itself, the
ReplaceMe fold against an explicit float64 Linear(T) applied by a hook (Gemma: the diagonal fold into
the post-FFN norm and the fold through it against explicit computations), all five pruners followed
by save / reload (identical logits; `load_pruned` where ReplaceMe put a linear module after Gemma's
norm) and cached generation, and the surgery of per-layer attention
patterns (Gemma's sliding-window / global layers).
"""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.statistics import MLP_OUT, RESIDUAL, Statistic, collect
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for, supported_model_types
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.saving import load_pruned, save_pruned
from depthbench.pruners import build_pruner
from tests.families import ALL_FAMILIES, FAMILIES, IDS, LAYERS, LAYOUT_VARIANTS, SLIDING, family_model
from tests.helpers import build_tiny_model, logits, random_batches

# Written out here, not taken from the adapters: the module whose output is what the MLP adds to the residual
# stream (the fold's target for exact families).
MLP_OUTPUT_MODULE = {
    "mistral": lambda b: b.mlp.down_proj, "qwen2": lambda b: b.mlp.down_proj, "qwen3": lambda b: b.mlp.down_proj,
    "phi3": lambda b: b.mlp.down_proj, "opt": lambda b: b.fc2, "gpt2": lambda b: b.mlp.c_proj,
    "gpt_neox": lambda b: b.mlp.dense_4h_to_h, "falcon": lambda b: b.mlp.dense_4h_to_h,
    "falcon_alibi": lambda b: b.mlp.dense_4h_to_h, "gpt_neox_sequential": lambda b: b.mlp.dense_4h_to_h,
    "falcon_sequential": lambda b: b.mlp.dense_4h_to_h, "falcon_new_arch": lambda b: b.mlp.dense_4h_to_h,
    "gemma2": lambda b: b.post_feedforward_layernorm, "gemma3": lambda b: b.post_feedforward_layernorm,
}
EXACT_FOLD = [f for f in FAMILIES if not f.startswith("gemma")]
PRUNERS = {"shortgpt": {}, "uidl": {}, "replaceme_ls": {}, "replaceme_cosine": {"epochs": 1},
           "llm_streamline": {"max_steps": 2}}


# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread hand-offs cost seconds
# per call.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_layer_forward_reproduces_the_model(family):
    """Sequences of 12 tokens: longer than the sliding windows (4), so a wrong mask shows."""
    model = family_model(family)
    adapter = adapter_for(model)
    assert adapter.decoder_layers() is LAYERS[family](model)
    batch = random_batches(n_batches=1, seq_len=12)[0]
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        h = states[0]
        for k in range(adapter.num_layers - 1):  # the last entry of hidden_states is after the final norm
            h = adapter.layer_forward(adapter.layer(k), h, batch["attention_mask"])
            torch.testing.assert_close(h[real], states[k + 1][real], rtol=1e-5, atol=1e-5)


class _Keep(Statistic):
    """Keeps the raw activations of one hook point set (test helper)."""

    def __init__(self, k):
        self.k, self.seen = k, []

    def hook_points(self):
        return {(MLP_OUT, self.k), (RESIDUAL, self.k + 1)}

    def update(self, batch):
        self.seen.append((batch.mlp_out(self.k), batch.residual(self.k + 1), batch.mask))


@pytest.mark.parametrize("family", FAMILIES + LAYOUT_VARIANTS)
def test_mlp_hook_point_is_the_residual_update(family):
    """M_k from the statistics hooks == h_{k+1} minus h_{k+1} of a copy whose layer-k MLP adds nothing."""
    dtype = torch.float32 if family == "gemma2" else torch.float64  # Gemma-2 eager sliding attention NaNs in float64
    model, k = family_model(family, dtype), 2
    batch = random_batches(n_batches=1)[0]
    (stat,) = collect(adapter_for(model), [batch], [_Keep(k)], progress=False)
    m, h_next, mask = stat.seen[0]
    silent = copy.deepcopy(model)
    with torch.no_grad():
        module = LAYERS[family](silent)[k]
        target = module.mlp.down_proj if family.startswith("gemma") else MLP_OUTPUT_MODULE[family](module)
        for p in target.parameters():
            p.zero_()
        y = silent(**batch, output_hidden_states=True, use_cache=False).hidden_states[k + 1]
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    real = mask.bool()
    assert m.shape == h_next.shape
    torch.testing.assert_close(m[real], (h_next - y)[real], rtol=tol, atol=tol)


@pytest.mark.parametrize("family", EXACT_FOLD + LAYOUT_VARIANTS)
def test_fold_equals_explicit_float64_linear(family):
    model = family_model(family, torch.float64)
    d, k = model.config.hidden_size, 2
    g = torch.Generator().manual_seed(1)
    T = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    explicit = copy.deepcopy(model)
    linear = nn.Linear(d, d, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(T.T)  # linear(x) = x T
    MLP_OUTPUT_MODULE[family](LAYERS[family](explicit)[k]).register_forward_hook(lambda mod, a, out: linear(out))
    ModelSurgery(adapter_for(model)).fold_into_mlp_output(k, T)
    batch = random_batches(n_batches=1)[0]
    folded, want = logits(model, batch), logits(explicit, batch)
    assert not torch.allclose(want, logits(family_model(family, torch.float64), batch))  # T changed something
    torch.testing.assert_close(folded, want, rtol=1e-10, atol=1e-10)


def _gemma_dtype(family):
    return torch.float32 if family == "gemma2" else torch.float64  # Gemma-2 eager sliding attention NaNs in float64


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_diagonal_fold_equals_explicit_scaling_of_the_normalised_output(family):
    """A diagonal T goes into the post-FFN norm's weight; the reference multiplies that norm's output by t."""
    dtype = _gemma_dtype(family)
    model, k = family_model(family, dtype), 2
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    t = 1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    with torch.no_grad():  # initialised to 0; a weight that is not would expose a fold ignoring the "1 +"
        LAYERS[family](model)[k].post_feedforward_layernorm.weight.normal_(0, 0.5, generator=g)
    explicit = copy.deepcopy(model)
    LAYERS[family](explicit)[k].post_feedforward_layernorm.register_forward_hook(
        lambda mod, a, out: (out.to(torch.float64) * t).to(out.dtype))
    ModelSurgery(adapter_for(model)).fold_into_mlp_output(k, torch.diag(t))
    batch = random_batches(n_batches=1)[0]
    folded, want = logits(model, batch), logits(explicit, batch)
    assert not torch.allclose(want, logits(family_model(family, dtype), batch))  # t changed something
    torch.testing.assert_close(folded, want, rtol=1e-5, atol=1e-5)  # Gemma's RMSNorm runs in float32 in any dtype


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_fold_through_the_norm_equals_explicit_float64_computation(family):
    """down_proj <- P^T W, norm gain <- g': the layer's MLP output is RMSNorm(u P) * g', u = down_proj's output."""
    dtype = _gemma_dtype(family)
    model, k = family_model(family, dtype), 2
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(2)
    P = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    gain = 1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    explicit = copy.deepcopy(model)
    norm = LAYERS[family](explicit)[k].post_feedforward_layernorm

    def through_norm(mod, args, out):
        v = args[0].to(torch.float64) @ P
        return (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + norm.eps) * gain).to(out.dtype)

    norm.register_forward_hook(through_norm)
    ModelSurgery(adapter_for(model)).fold_through_output_norm(k, P, gain)
    batch = random_batches(n_batches=1)[0]
    torch.testing.assert_close(logits(model, batch), logits(explicit, batch), rtol=1e-5, atol=1e-5)  # norm: float32


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_refuses_an_inexact_full_fold_and_leaves_the_model_alone(family):
    model = family_model(family)
    adapter = adapter_for(model)
    assert adapter.mlp_output_is_residual_update is False
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotImplementedError, match="post_feedforward_layernorm.*insert_mlp_output_linear"):
        ModelSurgery(adapter).fold_into_mlp_output(2, torch.eye(32) + 0.1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("options", [{"norm_fold": "through_norm"}, {"diag": True}])
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_replaceme_says_how_t_was_applied(family, options):
    """The zero-parameter routes; the default explicit linear module: tests/unit/test_gemma_linear.py."""
    model = family_model(family)
    result = build_pruner("replaceme_ls", options).prune(adapter_for(model), CalibrationData(random_batches(), 16), 2,
                                                          progress=False)
    info = result.replacement
    assert info["new_parameters"] == 0 and info["custom_code_needed"] is False
    (block,) = info["blocks"]
    if options.get("diag"):
        assert "exact" in block["applied"] and "through_norm_relative_error" not in block
    else:
        assert "fitted through" in block["applied"]
        assert 0 <= block["through_norm_relative_error"] <= block["through_norm_relative_error_at_start"] < 1


@pytest.mark.parametrize("pruner", list(PRUNERS))
@pytest.mark.parametrize("family", FAMILIES + LAYOUT_VARIANTS)
def test_pruner_then_save_reload_and_cached_generation(family, pruner, tmp_path):
    model = family_model(family)
    batches = random_batches(n_batches=2)
    result = build_pruner(pruner, PRUNERS[pruner]).prune(adapter_for(model), CalibrationData(batches, 16), 2,
                                                         progress=False)
    assert result.num_layers_after == 4 == model.config.num_hidden_layers == len(LAYERS[family](model))
    save_pruned(model, None, tmp_path / "pruned", result.to_dict())
    # ReplaceMe on Gemma defaults to an explicit linear module after the norm: depthbench's loader
    custom = bool((result.replacement or {}).get("custom_code_needed"))
    assert custom == (family.startswith("gemma") and pruner.startswith("replaceme"))
    reloaded = (load_pruned if custom else AutoModelForCausalLM.from_pretrained)(tmp_path / "pruned").eval()
    assert type(reloaded) is type(model) and reloaded.config.num_hidden_layers == 4
    batch = batches[0]
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)
    prompt = batch["input_ids"][:1, :6]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = reloaded.generate(prompt, use_cache=True, **kwargs)
    assert with_cache.shape[1] == 12
    assert torch.equal(with_cache, reloaded.generate(prompt, use_cache=False, **kwargs))
    assert torch.equal(with_cache, model.generate(prompt, use_cache=True, **kwargs))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_and_global_layers_stay_right_after_renumbering(family, tmp_path):
    model = family_model(family)
    layers = list(LAYERS[family](model))
    windows = [layer.self_attn.sliding_window for layer in layers]
    ModelSurgery(adapter_for(model)).remove_layers([0, 4])  # drops one sliding and one global layer
    keep = [1, 2, 3, 5]
    assert model.config.layer_types == [SLIDING[i] for i in keep]
    assert [layer.self_attn.layer_idx for layer in LAYERS[family](model)] == [0, 1, 2, 3]
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert [layer.self_attn.sliding_window for layer in LAYERS[family](reloaded)] == [windows[i] for i in keep]
    batch = random_batches(n_batches=1, seq_len=16)[0]  # longer than the window of 4
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)
    prompt = batch["input_ids"][:1, :8]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(prompt, use_cache=True, **kwargs),
                       reloaded.generate(prompt, use_cache=False, **kwargs))


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import BloomConfig

    model = build_tiny_model(BloomConfig(vocab_size=101, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(ConfigError, match=r"unsupported model family 'bloom'; supported: ") as err:
        adapter_for(model)
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "opt", "gpt2",
                       "gpt_neox", "falcon"):
        assert model_type in supported_model_types() and model_type in str(err.value)


def test_refusals_where_surgery_or_fold_would_change_the_model():
    import transformers as t

    gpt2 = build_tiny_model(t.GPT2Config(**IDS, n_embd=32, n_layer=4, n_head=4, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        ModelSurgery(adapter_for(gpt2)).remove_layers([1])
    opt_post_norm = build_tiny_model(t.OPTConfig(**IDS, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                                                 num_attention_heads=4, word_embed_proj_dim=32,
                                                 do_layer_norm_before=False))
    with pytest.raises(NotImplementedError, match="do_layer_norm_before"):
        ModelSurgery(adapter_for(opt_post_norm)).fold_into_mlp_output(1, torch.eye(32))

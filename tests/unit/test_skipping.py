"""Units skipped without surgery, and attention / MLP sub-blocks removed for good, on every family.

References are independent of `ModelAdapter.skipping`:
- skipped layers: a deep copy whose layers are deleted by the surgery (`remove_layers`);
- skipped sub-blocks: a deep copy whose sub-block output projection (weight and bias) is zeroed, so
  the sub-block adds exactly zero to the residual stream (projection names written out below);
- parallel attention + MLP (GPT-NeoX, Falcon): the layer's output with its attention skipped against
  ``h + mlp(norm(h))`` written by hand from the layer's own modules.
Everything runs in float64 (the save / reload round trip in float32, where transformers' own reload is
exact for every family) and compares at real tokens (padding may be anything).
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.calibration.statistics import MLP_OUT, RESIDUAL, Statistic, collect
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.saving import CUSTOM_MODULES_FILE, load_pruned, save_pruned
from depthbench.modeling.units import Unit, normalize_units
from tests.families import ALL_FAMILIES, LAYERS, family_model, window_batch
from tests.helpers import build_tiny_model, logits

TOL = dict(rtol=1e-12, atol=1e-12)


def _kind(family: str) -> str:
    """The layout a test family uses: llama (Mistral, Qwen2/3, Phi-3), gemma, opt, gpt2, gpt_neox, falcon."""
    return next((k for k in ("gemma", "opt", "gpt2", "gpt_neox", "falcon") if family.startswith(k)), "llama")


# Written out here, not taken from the adapters: the projection whose output is each sub-block's
# contribution (Gemma: the module feeding the post-norm, whose output is 0 when its input is 0).
ATTENTION_OUTPUT = {"llama": lambda b: b.self_attn.o_proj, "gemma": lambda b: b.self_attn.o_proj,
                    "opt": lambda b: b.self_attn.out_proj, "gpt2": lambda b: b.attn.c_proj,
                    "gpt_neox": lambda b: b.attention.dense, "falcon": lambda b: b.self_attention.dense}
MLP_OUTPUT = {"llama": lambda b: b.mlp.down_proj, "gemma": lambda b: b.mlp.down_proj, "opt": lambda b: b.fc2,
              "gpt2": lambda b: b.mlp.c_proj, "gpt_neox": lambda b: b.mlp.dense_4h_to_h,
              "falcon": lambda b: b.mlp.dense_4h_to_h}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snapshot, batch, logits_before):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in state.items():
        assert torch.equal(value, snapshot[key]), key
    assert not any("forward" in vars(m) for m in model.modules()), "a forward patch was left behind"
    assert torch.equal(logits(model, batch, use_cache=False), logits_before)


def _zeroed(model, family, units):
    """A copy whose listed sub-blocks add zero: their output projection's weight and bias set to 0."""
    ref = copy.deepcopy(model)
    layers = LAYERS[family](ref)
    with torch.no_grad():
        for k, part in units:
            proj = (ATTENTION_OUTPUT if part == "attention" else MLP_OUTPUT)[_kind(family)](layers[k])
            proj.weight.zero_()
            if getattr(proj, "bias", None) is not None:
                proj.bias.zero_()
    return ref


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_skipping_layers_equals_the_model_without_them(family):
    model, batch = family_model(family, torch.float64), window_batch()
    real = batch["attention_mask"].bool()
    before, snapshot = logits(model, batch, use_cache=False), _snapshot(model)
    adapter = adapter_for(model)
    with adapter.skipping([4, 1]) as units:
        assert units == [Unit(1), Unit(4)]
        got = logits(model, batch, use_cache=None)
    without = copy.deepcopy(model)
    ModelSurgery(adapter_for(without)).remove_layers([1, 4])
    assert len(LAYERS[family](without)) == 4
    torch.testing.assert_close(got[real], logits(without, batch, use_cache=False)[real], **TOL)
    assert not torch.allclose(got[real], before[real])  # skipping changed something
    _assert_untouched(model, snapshot, batch, before)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_skipping_sub_blocks_equals_a_copy_whose_sub_blocks_add_zero(family):
    model, batch = family_model(family, torch.float64), window_batch()
    real = batch["attention_mask"].bool()
    before, snapshot = logits(model, batch, use_cache=False), _snapshot(model)
    adapter = adapter_for(model)
    units = [(1, "attention"), (3, "mlp"), (4, "attention")]
    for one in units:  # each sub-block alone, then together
        with adapter.skipping([Unit(*one)]):
            got = logits(model, batch, use_cache=None)
        torch.testing.assert_close(got[real], logits(_zeroed(model, family, [one]), batch, use_cache=False)[real],
                                   **TOL)
        assert not torch.allclose(got[real], before[real])
    with adapter.skipping(["1.attn", "3.mlp", "4.attn"]):
        got = logits(model, batch, use_cache=None)
    torch.testing.assert_close(got[real], logits(_zeroed(model, family, units), batch, use_cache=False)[real], **TOL)
    _assert_untouched(model, snapshot, batch, before)


@pytest.mark.parametrize("family", ["gpt_neox", "falcon", "falcon_alibi", "falcon_new_arch"])
def test_parallel_layer_with_attention_skipped_is_residual_plus_mlp_branch(family):
    """Parallel attention + MLP: skipping attention leaves ``h + mlp(norm(h))`` (its norm: NeoX's
    ``post_attention_layernorm``, Falcon's shared ``input_layernorm`` or new-architecture ``ln_mlp``)."""
    model = family_model(family, torch.float64)
    adapter = adapter_for(model)
    layer = LAYERS[family](model)[2]
    norm = {"gpt_neox": "post_attention_layernorm", "falcon_new_arch": "ln_mlp"}.get(family, "input_layernorm")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 7, model.config.hidden_size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = h + layer.mlp(getattr(layer, norm)(h))
        with adapter.skipping(["2.attn"]):
            got = adapter.layer_forward(layer, h)
        full = adapter.layer_forward(layer, h)
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(full, want)


class _Keep(Statistic):
    """Keeps one batch's activations (test helper)."""

    def __init__(self, points):
        self.points, self.seen = points, None

    def hook_points(self):
        return self.points

    def update(self, batch):
        self.seen = batch


@pytest.mark.parametrize("family", ["mistral", "opt", "falcon"])
def test_statistics_inside_skipping_are_those_of_the_model_without_the_units(family):
    """Inside the context the adapter numbers layers as the model without the skipped layers does:
    h_0..h_5 and M_k of the skipped model equal those of a copy with layer 1 removed and the two
    sub-blocks' projections zeroed; the skipped MLP's M_k is exactly 0."""
    model, batch = family_model(family, torch.float64), window_batch()
    real = batch["attention_mask"].bool()
    adapter = adapter_for(model)
    points = {(RESIDUAL, k) for k in range(6)} | {(MLP_OUT, k) for k in range(5)}
    with adapter.skipping([1, "3.mlp", "4.attn"]):
        assert adapter.num_layers == 5 and adapter.layer(1) is LAYERS[family](model)[2]
        (stat,) = collect(adapter, [batch], [_Keep(points)], progress=False)
    assert adapter.num_layers == 6 and adapter.decoder_layers() is LAYERS[family](model)
    reference = _zeroed(model, family, [(3, "mlp"), (4, "attention")])
    ModelSurgery(adapter_for(reference)).remove_layers([1])
    (want,) = collect(adapter_for(reference), [batch], [_Keep(points)], progress=False)
    for point in sorted(points):
        torch.testing.assert_close(stat.seen.points[point][real], want.seen.points[point][real], **TOL)
    assert torch.count_nonzero(stat.seen.mlp_out(2)[real]) == 0  # original layer 3's MLP


def test_surgery_is_refused_inside_skipping():
    model = family_model("mistral", torch.float64)
    adapter = adapter_for(model)
    with adapter.skipping([2]):
        surgery = ModelSurgery(adapter)
        for call in (lambda: surgery.remove_layers([0]),
                     lambda: ModelSurgery(adapter_for(model)).remove_units(["1.mlp"]),
                     lambda: surgery.replace_layer(0, copy.deepcopy(adapter.layer(0))),
                     lambda: surgery.insert_residual_patch(0, torch.eye(adapter.hidden_size)),
                     lambda: surgery.untie_output_embeddings()):
            with pytest.raises(RuntimeError, match="inside adapter.skipping"):
                call()
    assert model.config.num_hidden_layers == 6 and ModelSurgery(adapter).removed_sub_blocks() == []


@pytest.mark.parametrize("family", ["mistral", "falcon"])
def test_everything_is_restored_after_an_exception(family):
    model, batch = family_model(family, torch.float64), window_batch()
    before, snapshot = logits(model, batch, use_cache=False), _snapshot(model)
    adapter = adapter_for(model)
    with pytest.raises(KeyError, match="inside"), adapter.skipping([0, "2.mlp", "3.attn"]):
        logits(model, batch, use_cache=None)
        raise KeyError("inside")
    _assert_untouched(model, snapshot, batch, before)
    # an exception raised by the model's own forward (a cache is refused) restores as well
    with pytest.raises(ValueError, match="without a KV cache"), adapter.skipping([2]):
        model.generate(batch["input_ids"][:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="use_cache=True"), adapter.skipping(["1.attn"]):
        logits(model, batch, use_cache=True)
    _assert_untouched(model, snapshot, batch, before)


def test_nested_skipping_and_a_forward_set_by_someone_else_are_restored():
    """A module whose forward is already an instance attribute (as accelerate's dispatch sets it) gets
    that attribute back; nested contexts combine (the inner one numbers layers as the outer one left
    them: its 4.mlp is the original 5.mlp) and unwind in order."""
    model, batch = family_model("mistral", torch.float64), window_batch()
    real = batch["attention_mask"].bool()
    layer = LAYERS["mistral"](model)[2]
    calls = []
    original = layer.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = wrapped
    adapter = adapter_for(model)
    with adapter.skipping([2]):
        with adapter.skipping(["4.mlp"]):
            inner = logits(model, batch, use_cache=None)
        outer = logits(model, batch, use_cache=None)
    assert layer.forward is wrapped and not calls
    both = copy.deepcopy(model)
    del LAYERS["mistral"](both)[2].forward
    with adapter_for(both).skipping([2, "5.mlp"]):
        torch.testing.assert_close(inner[real], logits(both, batch, use_cache=None)[real], rtol=0, atol=0)
    with adapter_for(both).skipping([2]):
        torch.testing.assert_close(outer[real], logits(both, batch, use_cache=None)[real], rtol=0, atol=0)
    logits(model, batch, use_cache=False)
    assert calls


def _removed_parameter_names(model, family, layer_index, part) -> set[str]:
    """Names of the parameters a removed sub-block takes with it (written out per family)."""
    layers = LAYERS[family](model)
    prefix = next(n for n, m in model.named_modules() if m is layers[layer_index])
    kind = _kind(family)
    if part == "attention":
        own = {"llama": ["self_attn", "input_layernorm"], "opt": ["self_attn", "self_attn_layer_norm"],
               "gemma": ["self_attn", "input_layernorm", "post_attention_layernorm"], "gpt2": ["attn", "ln_1"],
               "gpt_neox": ["attention", "input_layernorm"], "falcon": ["self_attention"]}[kind]
        if family == "falcon_new_arch":
            own.append("ln_attn")
        elif family == "falcon_sequential":
            own.append("input_layernorm")
    else:
        own = {"llama": ["mlp", "post_attention_layernorm"], "opt": ["fc1", "fc2", "final_layer_norm"],
               "gemma": ["mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"], "gpt2": ["mlp", "ln_2"],
               "gpt_neox": ["mlp", "post_attention_layernorm"], "falcon": ["mlp"]}[kind]
        if family == "falcon_new_arch":
            own.append("ln_mlp")
        elif family == "falcon_sequential":
            own.append("post_attention_layernorm")
    return {f"{prefix}.{name}.{p}" for name in own for p, _ in getattr(layers[layer_index], name).named_parameters()}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_sub_block_removal_then_save_and_reload(family, tmp_path):
    """remove_units == skipping the same units (float64); the parameters of the removed sub-blocks
    are gone; the saved directory refuses plain from_pretrained and `load_pruned` gives identical
    logits (float32: transformers' own float64 reload of Gemma recomputes a buffer in float64)."""
    batch = window_batch()
    real = batch["attention_mask"].bool()
    units = ["1.attn", "4.mlp", 2]  # layer 2 goes first: 4.mlp becomes 3.mlp
    model = family_model(family, torch.float64)
    gone = _removed_parameter_names(model, family, 1, "attention") | _removed_parameter_names(model, family, 4, "mlp")
    with adapter_for(model).skipping(units):
        skipped = logits(model, batch, use_cache=None)
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_units(units)
    assert ModelSurgery(adapter).removed_sub_blocks() == [Unit(1, "attention"), Unit(3, "mlp")]
    assert model.config.num_hidden_layers == 5 == len(LAYERS[family](model))
    torch.testing.assert_close(logits(model, batch, use_cache=False)[real], skipped[real], **TOL)
    names = {n for n, _ in model.named_parameters()}
    renamed = {n.replace(".4.", ".3.") if ".4." in n else n for n in gone}  # layer 4 is now layer 3
    assert not names & renamed and len(gone) >= 2

    model32 = model.to(torch.float32)
    save_pruned(model32, None, tmp_path / "pruned", {"removed_units": [str(Unit.parse(str(u))) for u in units]},
                sub_blocks="removed")  # depthbench's own layout; the default zeroed form: test_surgery_and_saving
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert "removed_sub_blocks" in (tmp_path / "pruned" / CUSTOM_MODULES_FILE).read_text()
    reloaded = load_pruned(tmp_path / "pruned")
    assert ModelSurgery(adapter_for(reloaded)).removed_sub_blocks() == [Unit(1, "attention"), Unit(3, "mlp")]
    assert {n for n, _ in reloaded.named_parameters()} == {n for n, _ in model32.named_parameters()}
    torch.testing.assert_close(logits(reloaded, batch, use_cache=False)[real],
                               logits(model32, batch, use_cache=False)[real], rtol=0, atol=0)
    prompt = batch["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(prompt, use_cache=True, **kwargs),
                       reloaded.generate(prompt, use_cache=False, **kwargs))


def test_parameter_counts_of_units_are_the_sums_of_their_modules():
    model = family_model("mistral", torch.float64)
    adapter = adapter_for(model)
    layer = LAYERS["mistral"](model)[1]

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    attention = count(layer.self_attn, layer.input_layernorm)
    assert adapter.unit_parameter_count("1.attn") == attention
    assert adapter.unit_parameter_count("1.mlp") == count(layer.mlp, layer.post_attention_layernorm)
    assert adapter.unit_parameter_count(1) == count(layer)
    total = count(model)
    ModelSurgery(adapter).remove_units(["1.attn"])
    assert count(model) == total - attention
    assert adapter.unit_parameter_count("1.attn") == 0


def test_units_print_parse_sort_and_normalise():
    assert [str(u) for u in (Unit(12), Unit(12, "attention"), Unit(12, "mlp"))] == ["12", "12.attn", "12.mlp"]
    for text in ("0", "7.attn", "7.mlp"):
        assert str(Unit.parse(text)) == text
    assert sorted([Unit(3, "mlp"), Unit(3), Unit(1, "mlp"), Unit(3, "attention")]) == [
        Unit(1, "mlp"), Unit(3), Unit(3, "attention"), Unit(3, "mlp")]
    assert normalize_units([5, "5.attn", "2.attn", "2.mlp", "4.mlp", "4.mlp", Unit(0, "attention")]) == [
        Unit(0, "attention"), Unit(2), Unit(4, "mlp"), Unit(5)]
    for bad in ("x", "3.ffn", "-1", "3.", True, 2.5):
        with pytest.raises(ConfigError, match="unit"):
            normalize_units([bad])
    with pytest.raises(ConfigError, match="part 'head'"):
        Unit(1, "head")


def test_bad_units_are_refused_before_anything_changes():
    import transformers as t

    model = family_model("mistral", torch.float64)
    adapter = adapter_for(model)
    snapshot = _snapshot(model)
    with pytest.raises(ConfigError, match=r"units \['6.mlp'\]: the model has layers 0..5"):
        ModelSurgery(adapter).remove_units(["1.attn", "6.mlp"])
    with pytest.raises(ConfigError, match="all 6"), adapter.skipping(range(6)):
        pass
    with pytest.raises(ConfigError, match="all 6"):
        ModelSurgery(adapter).remove_units([0, 1, 2, 3, "4.attn", "4.mlp", 5])  # 4's two sub-blocks are layer 4
    assert ModelSurgery(adapter).removed_sub_blocks() == [] and model.config.num_hidden_layers == 6
    assert _snapshot(model).keys() == snapshot.keys()
    post_norm = build_tiny_model(t.OPTConfig(vocab_size=101, pad_token_id=0, hidden_size=32, ffn_dim=64,
                                             num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=32,
                                             do_layer_norm_before=False))
    opt = adapter_for(post_norm)
    with pytest.raises(ConfigError, match="do_layer_norm_before"):
        ModelSurgery(opt).remove_units([1, "2.mlp"])
    assert post_norm.config.num_hidden_layers == 4
    with opt.skipping([1]):  # whole layers are fine
        pass

"""Shortened LLaMA, both criteria, against independent computations (METHODS-MORE 2 (c)).

- PPL: the order is the argsort of the float64 NLL of deep copies with each layer actually deleted.
- Taylor: ``I_k = sum over layer k's weights of sum |sum_batches W * g|`` with g from `torch.autograd.grad` of a
  float64 mean cross-entropy written out here (real targets with a real context token), per batch; on a
  bfloat16 model the float32 accumulator against float64 sums of the same gradients (same order, same
  layers), and no two weights' gradients alive at once.
- "+": the first 4 and last 2 layers are never removed; without it the first R of the full order go.
"""

import copy
import math

import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.service import CalibrationService
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_llama64, build_tiny_model, random_batches, tiny_llama_config
from tests.reference import nll_float64, without_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")
L = 10


def tiny_model(seed: int = 5):
    return build_tiny_llama64(num_layers=L, seed=seed)


def calibration():
    return CalibrationData(random_batches(n_batches=2, batch_size=3, seq_len=12, seed=13), 12)


def argsort(values: dict) -> list[int]:
    return sorted(values, key=lambda k: (values[k], k))


@pytest.mark.parametrize("evaluation", ["tail", "full"])
def test_ppl_order_is_the_argsort_of_the_nll_with_each_layer_deleted(evaluation):
    model, data = tiny_model(), calibration()
    nll = {k: nll_float64(without_layers(model, [k]), data.batches) for k in range(L)}
    order = argsort(nll)
    pruner = build_pruner("shortened_ppl", {"plus": False, "evaluation": evaluation})
    result = pruner.prune(adapter_for(model), data, 3, progress=False)
    scores = result.selection.scores
    assert scores["values"] == pytest.approx([math.exp(nll[k]) for k in range(L)], rel=1e-10)
    assert scores["order"] == order
    assert result.removed_layers == sorted(order[:3])


def test_ppl_plus_rule_takes_the_first_r_eligible_layers_of_the_order():
    model, data = tiny_model(seed=6), calibration()
    nll = {k: nll_float64(without_layers(model, [k]), data.batches) for k in range(L)}
    eligible = [k for k in argsort(nll) if k not in {0, 1, 2, 3, L - 2, L - 1}]
    result = build_pruner("shortened_ppl").prune(adapter_for(model), data, 3, progress=False)
    assert result.selection.scores["order"] == eligible
    assert result.removed_layers == sorted(eligible[:3])


def taylor_reference(model, batches) -> list[float]:
    """Per layer: sum over its ``*weight`` tensors of sum |sum over batches of W * dCE/dW| (float64)."""
    params = [[p for name, p in layer.named_parameters() if name.endswith("weight")] for layer in model.model.layers]
    flat = [p for group in params for p in group]
    sums = [torch.zeros_like(p) for p in flat]
    for batch in batches:
        logits = model(**batch, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        keep = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
        picked = logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)[keep]
        grads = torch.autograd.grad(-picked.mean(), flat)
        for total, p, g in zip(sums, flat, grads):
            total += (p * g).detach()
    out, i = [], 0
    for group in params:
        out.append(float(sum(sums[i + j].abs().sum() for j in range(len(group)))))
        i += len(group)
    return out


def test_taylor_importance_equals_autograd_and_leaves_parameters_as_they_were():
    model, data = tiny_model(), calibration()
    want = taylor_reference(copy.deepcopy(model), data.batches)
    layer_norm = model.model.layers[3].input_layernorm.weight
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed state, to be kept as it was
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    adapter = adapter_for(model)
    selection = build_pruner("shortened_taylor", {"plus": False}).select(
        [], adapter, 2, CalibrationService(adapter, data, progress=False))
    scores = selection.scores
    # transformers' loss casts the logits to float32: agreement to ~1e-8, far below what a wrong mask,
    # an absolute value taken per batch or a missing weight would change (percents)
    assert scores["values"] == pytest.approx(want, rel=1e-6)
    order = argsort(dict(enumerate(want)))
    assert scores["order"] == order and selection.removed_layers == sorted(order[:2])
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and layer_norm.grad is None
    assert len(want) == L and min(want) > 0


def own_loss_taylor_float64(model, batches) -> list[float]:
    """As `taylor_reference`, with the model's own loss (labels: the input ids, -100 where the target or its
    context is padding, written out here) and float64 sums of float64 products of whatever dtype the model
    has: the exact sum the accumulator approximates, on the same gradients."""
    params = [[p for name, p in layer.named_parameters() if name.endswith("weight")] for layer in model.model.layers]
    flat = [p for group in params for p in group]
    sums = [torch.zeros(p.shape, dtype=torch.float64) for p in flat]
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.clone()
        labels[:, 0] = -100
        labels[:, 1:][(mask[:, 1:] == 0) | (mask[:, :-1] == 0)] = -100
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        for total, p, g in zip(sums, flat, torch.autograd.grad(loss, flat)):
            total += p.detach().double() * g.double()
    out, i = [], 0
    for group in params:
        out.append(sum(float(sums[i + j].abs().sum()) for j in range(len(group))))
        i += len(group)
    return out


def test_taylor_float32_accumulator_on_a_bfloat16_model_ranks_as_the_float64_sums():
    """bfloat16 weights and gradients: their products are exact in float32, so the float32 accumulator's
    only error is its additions over the 8 batches, at most 7 x 2^-24 (4e-7) of the summed magnitudes;
    rel 2e-6 leaves room for cancellation and is far below the smallest relative gap between two layers'
    scores (asserted), so the order and the removed layers are the float64 ones. ``accumulator: float64``
    reproduces the float64 sums exactly (the same products, added in the same order)."""
    model = build_tiny_model(tiny_llama_config(num_layers=L), seed=8, dtype=torch.bfloat16)
    data = CalibrationData(random_batches(n_batches=8, batch_size=3, seq_len=12, seed=21), 12)
    want = own_loss_taylor_float64(copy.deepcopy(model), data.batches)
    ranked = sorted(want)
    smallest_gap = min((b - a) / a for a, b in zip(ranked, ranked[1:]))
    assert smallest_gap > 100 * 2e-6
    order = argsort(dict(enumerate(want)))
    runs = {}
    for accumulator in ("float32", "float64"):
        pruner = build_pruner("shortened_taylor", {"plus": False, "accumulator": accumulator})
        result = pruner.prune(adapter_for(copy.deepcopy(model)), data, 3, progress=False)
        runs[accumulator] = result.selection.scores
        assert result.selection.scores["order"] == order and result.removed_layers == sorted(order[:3])
        assert result.selection.scores["accumulator"] == accumulator
    assert runs["float32"]["values"] == pytest.approx(want, rel=2e-6)
    assert runs["float32"]["values"] != want  # float32 additions did round: the comparison is not vacuous
    assert runs["float64"]["values"] == want


def test_taylor_frees_each_gradient_before_the_next_and_restores_a_callers_grad():
    """Backward never holds two decoder weights' gradients at once: a hook of the test, which runs before the
    pruner's on the same weight, sees exactly one ``.grad`` among them (its own) each time, once per weight and
    batch. A ``.grad`` set before the run is there afterwards, unchanged."""
    model, data = tiny_model(), calibration()
    weights = [p for layer in model.model.layers for name, p in layer.named_parameters() if name.endswith("weight")]
    seen = []
    handles = [p.register_post_accumulate_grad_hook(
        lambda p: seen.append(sum(w.grad is not None for w in weights))) for p in weights]
    earlier = torch.full_like(weights[5], 0.25)
    weights[5].grad = earlier.clone()
    want = taylor_reference(copy.deepcopy(model), data.batches)
    scores = build_pruner("shortened_taylor", {"plus": False}).prune(adapter_for(model), data, 2,
                                                                      progress=False).selection.scores
    for handle in handles:
        handle.remove()
    assert seen == [1] * (len(weights) * len(data.batches))
    assert scores["values"] == pytest.approx(want, rel=1e-6)
    assert torch.equal(weights[5].grad, earlier)
    assert all(p.grad is None for i, p in enumerate(weights) if i != 5)


def test_taylor_unknown_accumulator_fails_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"shortened_taylor accumulator='float16'; allowed: auto, float32, float64"):
        build_pruner("shortened_taylor", {"accumulator": "float16"})


def test_taylor_plus_never_removes_the_first_four_and_last_two_layers():
    model, data = tiny_model(seed=7), calibration()
    want = taylor_reference(copy.deepcopy(model), data.batches)
    eligible = [k for k in argsort(dict(enumerate(want))) if k not in {0, 1, 2, 3, L - 2, L - 1}]
    result = build_pruner("shortened_taylor").prune(adapter_for(model), data, 2, progress=False)
    assert result.removed_layers == sorted(eligible[:2])
    assert sorted(eligible) == [4, 5, 6, 7]
    assert result.selection.scores["order"] == eligible


@pytest.mark.parametrize("name", ["shortened_ppl", "shortened_taylor"])
def test_too_few_eligible_layers_fail_before_any_pass(monkeypatch, name):
    passes = []
    monkeypatch.setattr(CalibrationService, "masked_nll", lambda *a, **k: passes.append(1))
    model = tiny_model()
    with pytest.raises(ConfigError, match=rf"{name} cannot remove 5 of 10 layers with plus=true.*only 4 layers"):
        build_pruner(name).prune(adapter_for(model), calibration(), 5, progress=False)
    with pytest.raises(ConfigError, match=r"keep_first=-1; allowed: an integer >= 0"):
        build_pruner(name, {"keep_first": -1})
    assert passes == [] and model.config.num_hidden_layers == L
    assert all(p.grad is None for p in model.parameters())


def test_ppl_with_padding_in_the_data_equals_the_unpadded_windows():
    """The padding is masked: appending pad tokens to every sequence changes no score."""
    model = tiny_model()
    batches = random_batches(n_batches=2, batch_size=3, seq_len=12, seed=13)
    padded = [{key: torch.cat([value, torch.zeros(value.shape[0], 5, dtype=value.dtype)], dim=1)
               for key, value in batch.items()} for batch in batches]
    run = [build_pruner("shortened_ppl", {"plus": False}).select([], adapter_for(model), 2,
                                                                 CalibrationService(adapter_for(model),
                                                                                    CalibrationData(b, 17),
                                                                                    progress=False))
           for b in (batches, padded)]
    assert run[1].scores["values"] == pytest.approx(run[0].scores["values"], rel=1e-10)


def test_taylor_auto_accumulator_is_float32_for_16_bit_weights_and_float64_otherwise():
    """``auto`` (the default): float32 only where the products are exact in it (bfloat16 / float16 weights); a
    float32 model keeps the float64 sums, bit for bit the explicit float64 run's scores."""
    from depthbench.pruners.methods.shortened_llama import effective_accumulator

    assert effective_accumulator("auto", [torch.zeros(2, dtype=torch.bfloat16)] * 2) == "float32"
    assert effective_accumulator("auto", [torch.zeros(2, dtype=torch.float16), torch.zeros(2)]) == "float64"
    assert effective_accumulator("float32", [torch.zeros(2)]) == "float32"
    runs = {}
    for accumulator in ("auto", "float64"):
        pruner = build_pruner("shortened_taylor", {"plus": False, "accumulator": accumulator})
        result = pruner.prune(adapter_for(tiny_model()), calibration(), 2, progress=False)
        runs[accumulator] = result.selection.scores
    assert runs["auto"]["accumulator"] == "float64"
    assert runs["auto"] == runs["float64"]

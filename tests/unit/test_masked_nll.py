"""`CalibrationService.masked_nll`: many candidates, each with one more unit skipped, from the residual stream.

Reference: `CalibrationService.nll` with the candidate added to the skip set, a whole forward pass of the
model with those units skipped (itself tested against models rebuilt without the layers in
test_calibration_service.py and test_skipping.py). Float64 tiny models of every family, ragged padding,
random skip sets and candidates at both granularities (whole layers and attention / MLP sub-blocks).
"""

import random

import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.service import CalibrationService
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.adapters.base import ModelAdapter
from depthbench.modeling.units import Unit
from tests.helpers import build_tiny_llama64, build_tiny_model, random_batches, tiny_llama_config
from tests.families import FAMILIES, LAYOUT_VARIANTS, family_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = dict(rel=1e-11, abs=1e-12)
L = 6


def _service(model, **kwargs):
    batches = random_batches(n_batches=2, batch_size=3, seq_len=10, seed=5)  # ragged right padding
    return CalibrationService(adapter_for(model), CalibrationData(batches, 10), progress=False, **kwargs)


def _random_units(rng: random.Random, n: int) -> list:
    units = []
    for _ in range(n):
        k = rng.randrange(L)
        units.append(rng.choice([k, f"{k}.attn", f"{k}.mlp"]))
    return units


ALL = ["llama"] + FAMILIES + LAYOUT_VARIANTS + ["falcon_alibi", "mistral_sliding", "qwen2_sliding"]


@pytest.mark.parametrize("family", ALL)
def test_fast_nll_equals_a_whole_pass_with_the_candidate_skipped(family):
    config = tiny_llama_config(num_layers=L) if family == "llama" else family_config(family)
    service = _service(build_tiny_model(config, dtype=torch.float64))
    rng = random.Random(family)
    for skip in ([], _random_units(rng, 1), _random_units(rng, 2), [1, "3.mlp", "4.attn"]):
        candidates = list(range(L)) + [f"{k}.attn" for k in range(L)] + [f"{k}.mlp" for k in range(L)]
        if family != "llama":  # every candidate on Llama, a random third elsewhere (whole passes are slow)
            candidates = rng.sample(candidates, 6)
        got = service.masked_nll(candidates, skip=skip)
        assert list(got) == list(dict.fromkeys(candidates))
        for c in candidates:
            want = service.nll(skip=[*skip, c])
            assert got[c] == pytest.approx(want, **TOL), (skip, c)


def test_candidate_already_skipped_gets_the_nll_of_the_skip_set_and_keys_are_as_given():
    service = _service(build_tiny_llama64(num_layers=L))
    got = service.masked_nll([2, "2.attn", Unit(4, "mlp"), "3.mlp"], skip=[2, "3.attn"])
    assert set(got) == {2, "2.attn", Unit(4, "mlp"), "3.mlp"}
    assert got[2] == pytest.approx(service.nll(skip=[2, "3.attn"]), **TOL)
    assert got["2.attn"] == got[2]
    assert got["3.mlp"] == pytest.approx(service.nll(skip=[2, 3]), **TOL)  # both sub-blocks: the layer
    assert service.masked_nll([], skip=[1]) == {}


def _count_layer_calls(model, adapter):
    calls = []
    handles = [layer.register_forward_hook(lambda module, args, output, k=k: calls.append(k))
               for k, layer in enumerate(adapter.decoder_layers())]
    return calls, handles


def test_each_candidate_runs_only_the_layers_from_its_own_up():
    """Per batch: the walk runs layers 0..L-2 once, candidate j runs layers j+1..L-1 (layer j skipped),
    so L-1 + L(L-1)/2 layer calls against L(L-1) for a whole pass per candidate."""
    model = build_tiny_llama64(num_layers=L)
    service = _service(model)
    calls, handles = _count_layer_calls(model, service.adapter)
    try:
        service.masked_nll(list(range(L)))
        fast = len(calls)
        calls.clear()
        for k in range(L):
            service.nll(skip=[k])
        whole = sum(1 for _ in calls)
    finally:
        for h in handles:
            h.remove()
    batches = len(service.batches)
    assert fast == batches * ((L - 1) + L * (L - 1) // 2)
    assert whole == batches * L * L  # skipped layers' hooks fire too (they pass their input through)


def test_bad_units_fail_before_any_pass():
    model = build_tiny_llama64(num_layers=L)
    service = _service(model)
    calls, handles = _count_layer_calls(model, service.adapter)
    try:
        with pytest.raises(ConfigError, match="the model has layers 0..5"):
            service.masked_nll([1, 6])
        with pytest.raises(ConfigError, match="cannot skip or remove all 6"):
            service.masked_nll([5], skip=[0, 1, 2, 3, 4])
        with pytest.raises(ConfigError, match="unit '2.ffn'"):
            service.masked_nll(["2.ffn"])
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_an_adapter_without_single_layer_forward_falls_back_to_whole_passes():
    model = build_tiny_llama64(num_layers=L)
    adapter = adapter_for(model)

    class NoSingleLayers(type(adapter)):
        layer_forward = ModelAdapter.layer_forward  # the base's: not implemented

    service = _service(model)
    plain = CalibrationService(NoSingleLayers(model), service.calibration, progress=False)
    got = plain.masked_nll([1, "2.mlp"], skip=[4])
    assert got == {1: service.nll(skip=[4, 1]), "2.mlp": service.nll(skip=[4, "2.mlp"])}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_token_nll_sum_in_chunks_equals_a_float64_loop_over_real_tokens(monkeypatch, dtype):
    """`token_nll_sum` a few positions at a time (chunks of 2 here, and one short last chunk) against an explicit
    float64 loop over the predicted tokens whose context and target are both real; a padding position's logits,
    even NaN, count for nothing."""
    import math

    from depthbench import chunks
    from depthbench.calibration.masked_nll import token_nll_sum

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 9, 13, generator=g) * 3).to(dtype)
    ids = torch.randint(0, 13, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    logits[1, 7] = math.nan
    width = torch.finfo(torch.promote_types(dtype, torch.float32)).bits // 8
    monkeypatch.setattr(chunks, "CPU_CHUNK_BYTES", 13 * width * 2)
    expected, count = 0.0, 0
    for b in range(3):
        for t in range(8):
            if mask[b, t] and mask[b, t + 1]:
                row = logits[b, t].to(torch.float64)
                expected -= float(row[ids[b, t + 1]] - torch.logsumexp(row, 0))
                count += 1
    total, n = token_nll_sum(logits, ids, mask)
    assert n == count == 8 + 5 + 1
    # float32 log-softmax for the lower precisions (the function's documented precision), float64 for float64
    assert total == pytest.approx(expected, rel=1e-12 if dtype == torch.float64 else 1e-6)

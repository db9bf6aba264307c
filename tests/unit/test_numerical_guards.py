"""NaN/Inf guards: non-finite activations stop calibration; non-finite weights stop a save."""

import pytest
import torch

from depthbench.calibration.statistics import PairwiseSimilarity, collect
from depthbench.errors import NumericalError
from depthbench.experiments.pipeline import check_finite_parameters
from depthbench.modeling.adapters import adapter_for
from tests.helpers import random_batches


def test_non_finite_activations_stop_calibration_naming_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[2].mlp.down_proj.weight[0, 0] = float("inf")
    adapter = adapter_for(tiny_llama)
    with pytest.raises(NumericalError, match=r"non-finite activations in h_3 \(input of layer 3\)"):
        collect(adapter, random_batches(n_batches=1), [PairwiseSimilarity(6, 1, "all")], progress=False)


def test_padding_positions_never_enter_a_statistic(tiny_llama):
    """Only real tokens are reduced: garbage written into every padded position of layer 0's output
    (right padding: real tokens never attend to them) changes no statistic. (Not NaN: attention
    multiplies masked values by an exact 0, and 0 * NaN is NaN in any implementation.)"""
    adapter = adapter_for(tiny_llama)
    batch = random_batches(n_batches=1, ragged=True)[0]
    pad = batch["attention_mask"] == 0
    assert pad.any()
    clean = collect(adapter, [batch], [PairwiseSimilarity(6, 1, "all")], progress=False)[0]

    def poison(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out[pad] = 1e3 * torch.randn_like(out[pad])

    handle = tiny_llama.model.layers[0].register_forward_hook(poison)
    try:
        poisoned = collect(adapter, [batch], [PairwiseSimilarity(6, 1, "all")], progress=False)[0]
    finally:
        handle.remove()
    torch.testing.assert_close(poisoned.sum_cos, clean.sum_cos, rtol=1e-6, atol=1e-6)


def test_non_finite_weights_stop_before_saving(tiny_llama):
    check_finite_parameters(tiny_llama)  # a healthy model passes
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[3, 4] = float("nan")
    with pytest.raises(NumericalError, match=r"model.layers.1.mlp.down_proj.weight.*nothing was saved"):
        check_finite_parameters(tiny_llama)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_flags_any_non_finite_real_token_and_ignores_padding(dtype, bad):
    from depthbench.calibration.statistics import MLP_OUT, RESIDUAL, BatchActivations, check_finite

    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # right padding

    def acts(value, row, col):
        points = {(RESIDUAL, k): torch.randn(2, 5, 4, dtype=dtype) for k in range(3)}
        points[(MLP_OUT, 1)] = torch.randn(2, 5, 4, dtype=dtype)
        points[(MLP_OUT, 1)][row, col, 2] = value
        return BatchActivations(points=points, mask=mask, last_index=mask.sum(1) - 1)

    with pytest.raises(NumericalError, match=r"M_1 \(MLP output of layer 1\)"):
        check_finite(acts(bad, 1, 2))  # a real token
    check_finite(acts(bad, 1, 4))  # a padded position: allowed
    huge = torch.finfo(dtype).max
    big = acts(huge, 0, 0)
    big.points[(MLP_OUT, 1)][0, 1:, :] = huge  # finite values whose sum overflows
    check_finite(big)

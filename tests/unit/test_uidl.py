import numpy as np
import pytest

from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.calibration.batches import CalibrationData
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_model, random_batches, tiny_llama_config
from tests.reference import last_token_angular_distance_np, residual_states_np


@pytest.mark.parametrize("n,min_start", [(2, 1), (3, 0), (6, 0)])
def test_uidl_block_equals_brute_force_float64(n, min_start):
    L = 8
    model = build_tiny_model(tiny_llama_config(num_layers=L), seed=n)
    import torch
    model = model.to(torch.float64)
    batches = random_batches(n_batches=3, ragged=True, seed=n)
    hs, last = residual_states_np(model, batches)
    expected = {s: last_token_angular_distance_np(hs, last, s, n) for s in range(min_start, L - n + 1)}
    best = min(expected, key=lambda s: (expected[s], s))
    result = build_pruner("uidl", {"min_start": min_start}).prune(adapter_for(model), CalibrationData(batches, 16), n,
                                                                  progress=False)
    assert result.removed_layers == list(range(best, best + n))
    assert result.selection.scores["starts"] == list(expected)
    np.testing.assert_allclose(result.selection.scores["values"], list(expected.values()), rtol=1e-10)
    assert model.config.num_hidden_layers == L - n


def test_uidl_block_must_leave_a_layer():
    with pytest.raises(ConfigError, match="cannot remove 6 of 6 layers: allowed 1..5"):
        build_pruner("uidl", {"min_start": 1}).check_feasible(6, 6)


def test_uidl_options_are_checked():
    with pytest.raises(ConfigError, match="unknown option.*bogus.*allowed: min_start"):
        build_pruner("uidl", {"bogus": 1})
    with pytest.raises(ConfigError, match="min_start=2"):
        build_pruner("uidl", {"min_start": 2})

"""SLEB against an independent greedy search on models rebuilt without the layers (METHODS-MORE 1 (c)).

Reference: each candidate model is a deep copy with the layer actually deleted from its layer list (no
skipping, no adapter), scored by a float64 NLL written out here (log-softmax of the logits, real targets
whose context token is real). Tiny Llama, L = 6, R = 2, ragged padding.
"""

import copy

import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.service import CalibrationService
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_llama64, build_tiny_model, random_batches
from tests.reference import nll_float64, without_layers
from tests.families import family_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
L = 6


def tiny_model(seed: int = 3):
    return build_tiny_llama64(num_layers=L, seed=seed)


def calibration():
    return CalibrationData(random_batches(n_batches=2, batch_size=3, seq_len=12, seed=11), 12)


@pytest.fixture
def counted(monkeypatch):
    """Counts NLL evaluations (one per candidate), whichever service method answers them."""
    calls = []
    masked, whole = CalibrationService.masked_nll, CalibrationService.nll

    def masked_counted(self, candidates, skip=(), **kwargs):
        candidates = list(candidates)
        calls.extend([*skip, c] for c in candidates)
        return masked(self, candidates, skip=skip, **kwargs)

    def whole_counted(self, skip=(), **kwargs):
        calls.append(list(skip))
        return whole(self, skip=skip, **kwargs)

    monkeypatch.setattr(CalibrationService, "masked_nll", masked_counted)
    monkeypatch.setattr(CalibrationService, "nll", whole_counted)
    return calls


@pytest.mark.parametrize("evaluation", ["tail", "full"])
@pytest.mark.parametrize("seed", [3, 4])
def test_two_greedy_picks_equal_the_argmin_over_models_without_the_layer(counted, evaluation, seed):
    model, data = tiny_model(seed), calibration()
    reference = copy.deepcopy(model)
    # pick 1: argmin over original layers 1..4 of the model with that layer deleted
    first_nll = {k: nll_float64(without_layers(reference, [k]), data.batches) for k in range(1, L - 1)}
    pick1 = min(first_nll, key=lambda k: (first_nll[k], k))
    # pick 2: the same on the pruned model (positions 1..3 of the 5 surviving layers)
    alive = [k for k in range(L) if k != pick1]
    second_nll = {alive[j]: nll_float64(without_layers(reference, [pick1, alive[j]]), data.batches)
                  for j in range(1, len(alive) - 1)}
    pick2 = min(second_nll, key=lambda k: (second_nll[k], k))

    result = build_pruner("sleb", {"evaluation": evaluation}).prune(adapter_for(model), data, 2, progress=False)
    assert result.removed_layers == sorted([pick1, pick2])
    assert result.selection.scores["order"] == [pick1, pick2]
    steps = result.selection.scores["steps"]
    assert steps[0]["candidates"] == [1, 2, 3, 4] and steps[1]["candidates"] == alive[1:-1]
    for step, want in zip(steps, (first_nll, second_nll)):
        assert step["nll"] == pytest.approx([want[c] for c in step["candidates"]], rel=1e-10)
    assert len(counted) == 7 == result.selection.scores["evaluations"]  # R(L-2) - R(R-1)/2
    assert 0 not in result.removed_layers and L - 1 not in result.removed_layers
    assert model.config.num_hidden_layers == L - 2


def harmful_gpt2(k: int):
    """A tiny GPT-2 whose layer k adds a large constant along the (large) embedding of token 2, which never
    occurs in the data: with layer k, every position predicts token 2 (NLL in the tens); without it, the
    plain random model (NLL near log V). Removing k is then the best single removal by far."""
    model = build_tiny_model(family_config("gpt2"), seed=3, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64), dim=0)
    with torch.no_grad():
        model.transformer.wte.weight[2] = 10 * u  # tied: also the head's row of token 2
        model.transformer.h[k].mlp.c_proj.bias.copy_(100 * u)
    return model


@pytest.mark.parametrize("harmful", [0, L - 1])
def test_barriers_keep_the_first_and_last_layer_even_when_removing_them_is_best(harmful):
    model, data = harmful_gpt2(harmful), calibration()
    assert nll_float64(model, data.batches) > 20
    without_barriers = build_pruner("sleb", {"early_barrier": 0, "latter_barrier": 0})
    free = copy.deepcopy(model)
    assert without_barriers.prune(adapter_for(free), data, 1, progress=False).removed_layers == [harmful]
    result = build_pruner("sleb").prune(adapter_for(model), data, 2, progress=False)
    assert harmful not in result.removed_layers and not {0, L - 1} & set(result.removed_layers)
    assert all(not {0, L - 1} & set(step["candidates"]) for step in result.selection.scores["steps"])


def test_first_minimum_wins_on_ties():
    from depthbench.pruners.methods.sleb import first_argmin

    assert first_argmin([3, 1, 2], {1: 0.5, 2: 0.5, 3: 0.7}) == 1
    assert first_argmin([1, 2, 3], {1: 0.5, 2: 0.5, 3: 0.5}) == 1
    assert first_argmin([1, 2, 3], {1: 0.6, 2: 0.5, 3: 0.5}) == 2


@pytest.mark.parametrize("options, n_remove, message", [
    ({}, 5, r"sleb cannot remove 5 of 6 layers with early_barrier=1 and latter_barrier=1.*at most 4"),
    ({"early_barrier": 3, "latter_barrier": 2}, 2, r"at most 1"),
])
def test_infeasible_barriers_fail_before_any_pass(counted, options, n_remove, message):
    model = tiny_model()
    with pytest.raises(ConfigError, match=message):
        build_pruner("sleb", options).prune(adapter_for(model), calibration(), n_remove, progress=False)
    assert counted == [] and model.config.num_hidden_layers == L


@pytest.mark.parametrize("options, message", [
    ({"early_barrier": -1}, r"sleb early_barrier=-1; allowed: an integer >= 0"),
    ({"evaluation": "fast"}, r"sleb evaluation='fast'; allowed: tail, full"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        build_pruner("sleb", options)

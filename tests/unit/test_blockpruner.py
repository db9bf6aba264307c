"""BlockPruner against independent computations (METHODS-MORE section 5 (c)), on a tiny L=4 model:
every candidate's NLL from a model actually built without the sub-blocks (deep copy + `remove_units`)
and a float64 NLL written here; the greedy picks, the number of evaluations (8 + 7 + 6 = 21 for K = 3),
ties to the earlier candidate, and the ``params`` budget's stopping point."""

import copy

import pytest

from depthbench.calibration.batches import CalibrationData
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_llama64, random_batches
from tests.reference import nll_float64

L = 4
CANDIDATES = [f"{k}.attn" for k in range(L)] + [f"{k}.mlp" for k in range(L)]


def _model():
    return build_tiny_llama64(num_layers=L, seed=5)


def nll_without(model, batches, units) -> float:
    pruned = copy.deepcopy(model)
    ModelSurgery(adapter_for(pruned)).remove_units(units)
    return nll_float64(pruned, batches)


class CountingService:
    """Delegates to a real service and counts the candidate NLLs asked for."""

    def __init__(self, service):
        self.service, self.evaluations = service, []

    def masked_nll(self, candidates, skip=(), what=""):
        candidates = list(candidates)
        self.evaluations.append(len(candidates))
        return self.service.masked_nll(candidates, skip=skip, what=what)

    def __getattr__(self, name):
        return getattr(self.service, name)


def test_greedy_picks_equal_argmins_over_models_built_without_the_sub_blocks():
    batches = random_batches(n_batches=2, seed=3)
    model = _model()
    pruner = build_pruner("blockpruner", {"budget": "count", "n_modules": 3})
    with pruner.service(adapter_for(model), CalibrationData(batches, 16), progress=False) as service:
        counting = CountingService(service)
        selection = pruner.select([], adapter_for(model), 1, counting)
    assert counting.evaluations == [8, 7, 6] and selection.scores["evaluations"] == 21
    chosen: list[str] = []
    for step in selection.scores["steps"]:
        remaining = [c for c in CANDIDATES if c not in chosen]
        expected = {c: nll_without(model, batches, chosen + [c]) for c in remaining}
        assert step["candidates"].keys() == expected.keys()
        for c in remaining:
            assert step["candidates"][c] == pytest.approx(expected[c], rel=1e-10)
        best = min(remaining, key=lambda c: (expected[c], remaining.index(c)))
        assert step["removed"] == best
        chosen.append(best)
    assert selection.scores["removed_in_order"] == chosen
    first_pick = min(CANDIDATES, key=lambda c: (nll_without(model, batches, [c]), CANDIDATES.index(c)))
    assert chosen[0] == first_pick


class ConstantNLL:
    def __init__(self):
        self.skips = []

    def masked_nll(self, candidates, skip=(), what=""):
        self.skips.append([str(u) for u in skip])
        return {c: 1.0 for c in candidates}


def test_ties_go_to_the_earlier_candidate_attention_first():
    service = ConstantNLL()
    selection = build_pruner("blockpruner", {"budget": "count", "n_modules": 5}).select(
        [], adapter_for(_model()), 1, service)
    assert selection.scores["removed_in_order"] == ["0.attn", "1.attn", "2.attn", "3.attn", "0.mlp"]
    assert selection.removed_layers == [0] and selection.removed_sub_blocks == ["1.attn", "2.attn", "3.attn"]
    assert service.skips[1] == ["0.attn"]


def test_params_budget_stops_at_the_first_prefix_reaching_r_layers():
    batches = random_batches(n_batches=1, seed=6)
    model = _model()
    adapter = adapter_for(model)
    per_layer = adapter.parameter_counts()["per_layer"]
    size = {"attn": adapter.unit_parameter_count("0.attn"), "mlp": adapter.unit_parameter_count("0.mlp")}
    result = build_pruner("blockpruner").prune(adapter, CalibrationData(batches, 16), 1, progress=False)
    order = result.selection.scores["removed_in_order"]
    sizes = [size[u.split(".")[1]] for u in order]
    assert sum(sizes) >= per_layer > sum(sizes[:-1])
    removed = result.parameters_before["without_embeddings"] - result.parameters_after["without_embeddings"]
    assert removed == sum(sizes)
    assert result.removed_modules()["layer_equivalents_removed"] == pytest.approx(removed / per_layer)


def test_bad_options():
    with pytest.raises(ConfigError, match="budget='modules'; allowed: count, params"):
        build_pruner("blockpruner", {"budget": "modules"})
    with pytest.raises(ConfigError, match="n_modules=-1"):
        build_pruner("blockpruner", {"budget": "count", "n_modules": -1})

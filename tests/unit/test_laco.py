"""LaCo: RDSC arithmetic, the notebook's in-place bug, the scan on a mocked similarity sequence, the stop rules,
and the similarity and merged model against a direct rebuild of the merged model."""

import copy

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners import build_pruner
from depthbench.pruners.methods.laco import MergeState, capacity, merge_weights, scan
from tests.helpers import build_tiny_model, random_batches, build_tiny_llama64, tiny_llama_config

LINEAR = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def test_rdsc_adds_the_differences_per_weight_and_keeps_the_norms():
    model = build_tiny_model(tiny_llama_config(num_layers=5), seed=1)
    adapter = adapter_for(model)
    params = [{k: p.data for k, p in adapter.linear_parameters(layer).items()} for layer in model.model.layers]
    assert sorted(params[0]) == sorted(LINEAR)  # the projections, not the norms
    merged = merge_weights(params[1], params[2:5], "rdsc")
    for name in LINEAR:
        expected = params[1][name].double() + sum(params[k][name].double() - params[1][name].double()
                                                  for k in (2, 3, 4))
        torch.testing.assert_close(merged[name], expected.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_notebook_mode_ends_at_the_last_merged_layer(dtype):
    g = torch.Generator().manual_seed(0)
    layers = [{"w": torch.randn(16, 8, generator=g).to(dtype)} for _ in range(4)]
    out = merge_weights(layers[0], layers[1:], "notebook")["w"]
    # the reference's in-place w.add_(theta_{l+k} - w) leaves theta_{l+m}, up to one rounding of the last step
    ulp = torch.finfo(dtype).eps * max(float(t["w"].abs().max()) for t in layers)
    assert float((out.double() - layers[3]["w"].double()).abs().max()) <= 2 * ulp
    rdsc = merge_weights(layers[0], layers[1:], "rdsc")["w"]
    assert float((rdsc.double() - layers[3]["w"].double()).abs().max()) > 0.5


def _mock_scan(target, sims):
    calls = iter(sims)
    return scan(10, target, 3, 0.5, 1, 9, 0, lambda state, at, m: state.merge(at, m, FakeWeights(), "rdsc"),
                lambda state: next(calls))


class FakeWeights(list):
    def __getitem__(self, index):
        return {"w": torch.tensor([float(index)])}


def test_scan_on_a_mocked_similarity_sequence():
    """L=10, C=3, T=0.5, I=1, H=9, lo=0 (worked by hand): l=6 merges 7,8 (0.9, accepted); l=5 would merge 6,9 (0.3);
    l=4 merges 5,6 (0.8, accepted); l=3 would merge 4,9; l=2: 3,4; l=1: 2,3; l=0: 1,2 (all rejected)."""
    result = _mock_scan(None, [0.9, 0.3, 0.8, 0.2, 0.1, 0.1, 0.1])
    assert result.state.removed == [5, 6, 7, 8]
    assert [(t["into"], t["merged"], t["accepted"]) for t in result.trace] == [
        (6, [7, 8], True), (5, [6, 9], False), (4, [5, 6], True), (3, [4, 9], False), (2, [3, 4], False),
        (1, [2, 3], False), (0, [1, 2], False)]
    # layer 4 now holds theta_4 + (theta_5 - theta_4) + (theta_6* - theta_4), theta_6* = theta_6 + (7-6) + (8-6)
    assert float(result.state.weights[4]["w"]) == 4 + (5 - 4) + ((6 + 1 + 2) - 4)


def test_scan_with_a_target_shrinks_the_last_merge_and_stops():
    result = _mock_scan(3, [0.9, 0.3, 0.8])
    assert result.state.removed == [5, 7, 8]
    assert [(t["into"], t["merged"]) for t in result.trace] == [(6, [7, 8]), (5, [6]), (4, [5])]


def test_capacity_and_infeasible_settings_fail_before_any_pass(counting_collect):
    assert capacity(10, 3, 1, 9, 0) == 9 - 0  # accepting everything collapses everything from lo up into lo
    with pytest.raises(ConfigError, match="removes at most"):
        build_pruner("laco", {"C": 3, "lo": 6}).check_feasible(10, 4)
    with pytest.raises(ConfigError, match="leave no merge"):
        build_pruner("laco", {"C": 7, "H": 5}).check_feasible(10, 2)
    for key, value in [("merge", "sum"), ("stop", "never"), ("C", 1), ("I", 0)]:
        with pytest.raises(ConfigError, match=f"laco {key}="):
            build_pruner("laco", {key: value})
    assert counting_collect == []


@torch.no_grad()
def _post_norm_states(model, batches):
    return [model(**b, output_hidden_states=True, use_cache=False).hidden_states[-1].double() for b in batches]


def _flattened_cosines(a_list, b_list, batches):
    values = []
    for a, b, batch in zip(a_list, b_list, batches):
        for n in range(a.shape[0]):
            real = batch["attention_mask"][n].bool()
            x, y = a[n][real].flatten(), b[n][real].flatten()
            values.append(float(x @ y / (x.norm() * y.norm())))
    return float(np.mean(values))


def _rebuild(model, merges):
    """The merged model from the accepted merges (original indices), written from the RDSC equation."""
    rebuilt = copy.deepcopy(model)
    weights = {k: {n: rebuilt.model.layers[k].get_parameter(n).data.double().clone() for n in LINEAR}
               for k in range(len(rebuilt.model.layers))}
    removed = []
    for merge in merges:
        into = merge["into"]
        weights[into] = {n: weights[into][n] + sum(weights[k][n] - weights[into][n] for k in merge["merged"])
                         for n in LINEAR}
        removed += merge["merged"]
    for k, layer in enumerate(rebuilt.model.layers):
        for n in LINEAR:
            layer.get_parameter(n).data = weights[k][n].to(layer.get_parameter(n).dtype)
    ModelSurgery(adapter_for(rebuilt)).remove_layers(removed)
    return rebuilt


def test_similarity_and_merged_model_equal_a_direct_rebuild():
    model = build_tiny_llama64(num_layers=8, seed=5)
    original = copy.deepcopy(model)
    batches = random_batches(n_batches=2, batch_size=4, seed=5)  # ragged: padding must not count
    result = build_pruner("laco", {"C": 3, "T": 0.3, "sentences": 6}).prune(
        adapter_for(model), CalibrationData(batches, 16), 3, progress=False)
    scores = result.selection.scores
    assert scores["sentences"] == 6 and len(result.removed_layers) == 3
    sentences = [batches[0], {k: v[:2] for k, v in batches[1].items()}]
    reference = _post_norm_states(original, sentences)
    first = scores["scan"][0]
    candidate = _rebuild(original, [first])
    assert first["similarity"] == pytest.approx(_flattened_cosines(reference, _post_norm_states(candidate, sentences),
                                                                   sentences), rel=1e-10)
    rebuilt = _rebuild(original, scores["merges"])
    for b in batches:
        torch.testing.assert_close(model(**b, use_cache=False).logits, rebuilt(**b, use_cache=False).logits,
                                   rtol=1e-10, atol=1e-12)


def test_threshold_above_one_removes_nothing_and_target_always_removes_r():
    batches = random_batches(n_batches=2, seed=2)
    model = build_tiny_model(tiny_llama_config(num_layers=8), seed=2)
    untouched = copy.deepcopy(model)
    result = build_pruner("laco", {"C": 3, "T": 1.5, "stop": "threshold"}).prune(
        adapter_for(model), CalibrationData(batches, 16), 3, progress=False)
    assert result.removed_layers == [] and model.config.num_hidden_layers == 8
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), untouched.state_dict().values()))
    for R in (1, 3, 5):
        model = build_tiny_model(tiny_llama_config(num_layers=8), seed=2)
        result = build_pruner("laco", {"C": 3, "T": 1.5}).prune(adapter_for(model), CalibrationData(batches, 16), R,
                                                               progress=False)
        assert len(result.removed_layers) == R and model.config.num_hidden_layers == 8 - R
        assert result.selection.scores["threshold_used"] < 1.5 and result.selection.scores["bisection"]


def test_merge_state_replays_in_current_numbering():
    state = MergeState.initial(6).merge(3, 2, FakeWeights(), "rdsc").merge(1, 2, FakeWeights(), "rdsc")
    assert state.alive == (0, 1) and state.removed == [2, 3, 4, 5] and 3 not in state.weights
    assert float(state.weights[1]["w"]) == 1 + (2 - 1) + ((3 + 1 + 2) - 1)

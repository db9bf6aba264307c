"""LLM-Drop against independent computations (METHODS-MORE section 4 (c)).

- scores: a float64 forward written from the Llama equations (`tests.reference.manual_llama_forward`) and,
  for ``drop_norm: false``, the model's own norm modules called directly on its h_k / Y_k;
- padding: ragged batches score as the same sequences run alone without padding;
- ``Y_k``: a zeroed ``o_proj`` gives ``Y_k = h_k`` and the same logits as the removed sub-block's stand-ins;
  the hook's ``Y_k`` equals ``h_{k+1} - M_k`` on every family (sequential and parallel layouts);
- joint: index i >= L is the MLP of layer i - L; iterative round 2 = scores of the model with round 1's
  module zeroed, from the float64 reference.
"""

import copy

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.statistics import MLP_OUT, RESIDUAL, ATTN_RESIDUAL, SubBlockSimilarity, collect
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners import build_pruner
from depthbench.pruners.methods.llm_drop import LLMDropPruner
from tests.helpers import build_tiny_llama64, build_tiny_model, random_batches, tiny_llama_config
from tests.families import ALL_FAMILIES, family_model, window_batch
from tests.reference import manual_llama_forward

L = 6
#: Against the float64 reference: the model's RMSNorm computes in float32 even in a float64 model.
TOL = dict(rtol=1e-6, atol=1e-8)


def _llama(seed=3):
    return build_tiny_llama64(num_layers=L, seed=seed)


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def reference_scores(model, sequences: list[torch.Tensor], drop_norm: bool) -> tuple[list[float], list[float]]:
    """1 - mean cos per layer (attention, MLP) over every token of the unpadded ``sequences`` [1, T]."""
    attn = [[] for _ in range(L)]
    mlp = [[] for _ in range(L)]
    layers = model.model.layers
    for ids in sequences:
        hs, ms = manual_llama_forward(model, ids)
        for k in range(L):
            y = hs[k + 1] - ms[k]
            if drop_norm:
                attn[k].append(_cos(hs[k], y).flatten())
                mlp[k].append(_cos(y, hs[k + 1]).flatten())
            else:
                with torch.no_grad():
                    attn[k].append(_cos(layers[k].input_layernorm(hs[k]), y - hs[k]).flatten())
                    mlp[k].append(_cos(layers[k].post_attention_layernorm(y), ms[k]).flatten())
    return ([1 - float(torch.cat(c).mean()) for c in attn], [1 - float(torch.cat(c).mean()) for c in mlp])


def _sequences(batches):
    """Every sequence of the batches alone, cut to its real tokens (right padding)."""
    return [b["input_ids"][i: i + 1, : int(b["attention_mask"][i].sum())] for b in batches
            for i in range(b["input_ids"].shape[0])]


@pytest.mark.parametrize("drop_norm", [True, False])
def test_scores_equal_float64_reference_on_ragged_batches(drop_norm):
    batches = random_batches(n_batches=2, seed=5)  # ragged: padding must not enter
    model = _llama()
    attn, mlp = reference_scores(model, _sequences(batches), drop_norm)
    result = build_pruner("llm_drop", {"target": "joint", "drop_norm": drop_norm}).prune(
        adapter_for(model), CalibrationData(batches, 16), 2, progress=False)
    scores = result.selection.scores
    np.testing.assert_allclose(scores["values"], attn + mlp, **TOL)
    # joint: the 2R = 4 modules with the lowest 1 - cos, index i >= L naming the MLP of layer i - L
    assert scores["units"] == [f"{k}.attn" for k in range(L)] + [f"{k}.mlp" for k in range(L)]
    lowest = sorted(range(2 * L), key=lambda i: ((attn + mlp)[i], i))[:4]
    expected = [f"{i}.attn" if i < L else f"{i - L}.mlp" for i in lowest]
    assert scores["dropped_in_order"] == expected


def test_joint_index_at_or_above_L_is_the_mlp_of_layer_i_minus_L():
    stat = SubBlockSimilarity(4)
    stat.sum_cos_attention = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    stat.sum_cos_mlp = torch.tensor([0.5, 0.99, 0.6, 0.98], dtype=torch.float64)
    stat.count = 1
    model = build_tiny_model(tiny_llama_config(num_layers=4))
    selection = LLMDropPruner(target="joint").select([stat], adapter_for(model), 1, service=None)
    assert selection.scores["dropped_in_order"] == ["1.mlp", "3.mlp"]  # indices 5 and 7
    assert selection.removed_sub_blocks == ["1.mlp", "3.mlp"] and selection.removed_layers == []
    only_attention = LLMDropPruner(target="attn").select([stat], adapter_for(model), 1, service=None)
    assert only_attention.removed_sub_blocks == ["3.attn"]


def test_zeroed_o_proj_gives_y_equal_h_and_the_stand_ins_logits():
    batch = random_batches(n_batches=1, seed=2)[0]
    real = batch["attention_mask"].bool()
    model = _llama()
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[2].self_attn.o_proj.weight.zero_()
    (stat,) = collect(adapter_for(zeroed), [batch], [_Points({(RESIDUAL, 2), (ATTN_RESIDUAL, 2)})], progress=False)
    torch.testing.assert_close(stat.seen[(ATTN_RESIDUAL, 2)][real], stat.seen[(RESIDUAL, 2)][real], rtol=0, atol=0)
    ModelSurgery(adapter_for(model)).remove_units(["2.attn"])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[real], zeroed(**batch).logits[real], rtol=1e-12, atol=1e-12)


class _Points:
    """A statistic that keeps the raw activations of one batch at the given points."""

    cacheable = False

    def __init__(self, points):
        self.points, self.seen = points, {}

    def hook_points(self):
        return self.points

    def update(self, batch):
        self.seen = {p: batch.points[p].to(torch.float64) for p in self.points}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_hooked_y_is_h_next_minus_mlp_output_on_every_family(family):
    batch = window_batch()
    real = batch["attention_mask"].bool()
    model = family_model(family, torch.float64)
    points = {(ATTN_RESIDUAL, 1), (RESIDUAL, 2), (MLP_OUT, 1), (RESIDUAL, 1)}
    (stat,) = collect(adapter_for(model), [batch], [_Points(points)], progress=False)
    y = stat.seen[(ATTN_RESIDUAL, 1)]
    torch.testing.assert_close(y[real], (stat.seen[(RESIDUAL, 2)] - stat.seen[(MLP_OUT, 1)])[real],
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y[real], stat.seen[(RESIDUAL, 1)][real])  # the attention did add something


def test_iterative_round_two_rescores_the_model_without_round_ones_module():
    batches = random_batches(n_batches=2, seed=9)
    model = _llama(seed=11)
    first_attn, _ = reference_scores(model, _sequences(batches), True)
    result = build_pruner("llm_drop", {"iterative": True}).prune(adapter_for(copy.deepcopy(model)),
                                                                 CalibrationData(batches, 16), 2, progress=False)
    rounds = result.selection.scores["rounds"]
    k1 = min(range(L), key=lambda k: (first_attn[k], k))
    assert rounds[0]["dropped"] == f"{k1}.attn"
    np.testing.assert_allclose(rounds[0]["scores"], first_attn, **TOL)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[k1].self_attn.o_proj.weight.zero_()
    second_attn, _ = reference_scores(zeroed, _sequences(batches), True)
    got = rounds[1]["scores"]
    assert got[k1] is None
    np.testing.assert_allclose([v for k, v in enumerate(got) if k != k1],
                               [v for k, v in enumerate(second_attn) if k != k1], **TOL)
    k2 = min((k for k in range(L) if k != k1), key=lambda k: (second_attn[k], k))
    assert result.selection.removed_sub_blocks == sorted([f"{k1}.attn", f"{k2}.attn"], key=lambda s: int(s[0]))


def test_params_budget_takes_the_shortest_prefix_reaching_r_layers():
    batches = random_batches(n_batches=1, seed=4)
    model = _llama()
    adapter = adapter_for(model)
    per_layer = adapter.parameter_counts()["per_layer"]
    attention = adapter.unit_parameter_count("0.attn")
    mlp = adapter.unit_parameter_count("0.mlp")
    result = build_pruner("llm_drop", {"target": "joint", "budget": "params"}).prune(
        adapter, CalibrationData(batches, 16), 1, progress=False)
    record = result.to_dict()
    order = record["scores"]["dropped_in_order"]
    sizes = [attention if u.endswith("attn") else mlp for u in order]
    assert sum(sizes) >= per_layer > sum(sizes[:-1])
    modules = record["removed_attention_modules"] + record["removed_mlp_modules"]
    assert modules == len(order)  # a layer whose two sub-blocks went counts once in each
    removed = record["parameters_before"]["without_embeddings"] - record["parameters_after"]["without_embeddings"]
    assert removed == sum(sizes)
    assert record["layer_equivalents_removed"] == pytest.approx(removed / per_layer)
    assert record["kv_cache_fraction_removed"] == pytest.approx(record["removed_attention_modules"] / L)


def test_bad_options_fail_before_any_work():
    with pytest.raises(ConfigError, match="target='heads'; allowed: attn, mlp, joint"):
        build_pruner("llm_drop", {"target": "heads"})
    with pytest.raises(ConfigError, match="budget='layers'; allowed: count, params"):
        build_pruner("llm_drop", {"budget": "layers"})
    with pytest.raises(ConfigError, match="n_modules=3 needs budget=count"):
        build_pruner("llm_drop", {"budget": "params", "n_modules": 3})
    with pytest.raises(ConfigError, match="cannot drop 7 modules"):
        build_pruner("llm_drop", {"n_modules": 7}).check_feasible(6, 2)
    # OPT's MLP has two output-side modules (fc1, fc2): no single raw module output
    opt = family_model("opt", torch.float64)
    with pytest.raises(ConfigError, match="drop_norm=false"):
        build_pruner("llm_drop", {"drop_norm": False}).check_model(adapter_for(opt))

"""MKA: the spec's test vectors (diffusion map, entropy, ranks, coefficient, the L=4 merge chain), the activations
against ``output_hidden_states``, the two point sets against explicit distances, NPIB against sklearn called
directly, ``merge: reference`` against ``last_layers``, the merged model against a direct rebuild, and the checks
that fail before any pass."""

import copy

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.prompt_sequences import PromptSequences, virtual_rows
from depthbench.calibration.statistics import collect
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners import build_pruner
from depthbench.pruners.base import Selection
from depthbench.pruners.methods.mka import (diffusion_map, knn_entropy, npib_alpha, npib_matrix, plan_merges,
                                    prompt_distances, rank_normalise, reference_distances)
from tests.helpers import build_tiny_model, compose, random_batches, build_tiny_llama64, tiny_llama_config

LINEAR = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


# -- the spec's vectors -----------------------------------------------------------------------------
def test_diffusion_map_of_three_points():
    x = np.array([0.0, 1.0, 4.0])
    result = diffusion_map(np.abs(x[:, None] - x[None, :]), sigma=1.0, alpha=0.5, dims=2)
    np.testing.assert_allclose(result.singular_values, [1.0, 0.668159, 0.409595], atol=1e-6)
    expected = np.array([[-0.805881, -0.585840, 1.426494], [-1.157685, 1.271604, -0.129209]]).T
    for c in range(2):  # each column up to sign
        sign = np.sign(result.coordinates[0, c] / expected[0, c])
        np.testing.assert_allclose(sign * result.coordinates[:, c], expected[:, c], atol=1e-6)
    assert result.regularisation_steps == 0


def test_entropy_ranks_and_coefficient():
    assert knn_entropy(np.arange(4.0)[:, None], k=1) == pytest.approx(np.log(4), abs=1e-12)
    np.testing.assert_allclose(rank_normalise(np.array([[0.3], [-1.0], [2.0]]))[:, 0], [1 / 3, 0, 2 / 3])
    assert npib_alpha(0.4, 0.4) == pytest.approx(0.6224593, abs=1e-7)
    assert npib_alpha(0.2, 0.6) == pytest.approx(0.5621765, abs=1e-7)


def test_four_layers_two_merges_at_alpha_06_give_the_hand_formula():
    """L=4, R=2, pair=last, alpha fixed at 0.6 (alpha=similarity on a constant S): kept theta_0 and
    0.6 theta_1 + 0.24 theta_2 + 0.16 theta_3, layer 1's norms."""
    model = build_tiny_llama64(num_layers=4, seed=3)
    dense = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in model.model.layers]
    merges = plan_merges(np.full((4, 4), 0.6), 2, pair="last", alpha="similarity")
    assert [(m["into"], m["merged"], m["alpha"]) for m in merges] == [(2, 3, 0.6), (1, 2, 0.6)]
    pruner = build_pruner("mka", {"alpha": "similarity"})
    pruner.apply(adapter_for(model), Selection(removed_layers=[2, 3], scores={"merges": merges}), None, None)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    kept = [dict(layer.named_parameters()) for layer in model.model.layers]
    for name in dense[0]:
        torch.testing.assert_close(kept[0][name], dense[0][name], rtol=0, atol=0)
    for name in LINEAR:
        expected = 0.6 * dense[1][name] + 0.24 * dense[2][name] + 0.16 * dense[3][name]
        torch.testing.assert_close(kept[1][name], expected, rtol=1e-12, atol=1e-14)
    for name in NORMS:
        torch.testing.assert_close(kept[1][name], dense[1][name], rtol=0, atol=0)


# -- merge planning --------------------------------------------------------------------------------
def test_most_similar_adjacent_reads_the_dense_matrix_at_the_layers_identities():
    S = np.array([[1.0, 0.2, 0.1, 0.3],
                  [0.2, 1.0, 0.9, 0.5],
                  [0.1, 0.9, 1.0, 0.4],
                  [0.3, 0.5, 0.4, 1.0]])
    merges = plan_merges(S, 2, pair="most_similar_adjacent", alpha="npib", beta=2.0)
    # step 1: adjacent S = 0.2, 0.9, 0.4 -> 2 into 1; step 2: current (0, 1, 3): S[0,1] = 0.2, S[1,3] = 0.5 -> 3 into 1
    assert [(m["position"], m["into"], m["merged"]) for m in merges] == [(1, 1, 2), (1, 1, 3)]
    s = S.mean(1)  # hand: (0.4, 0.65, 0.6, 0.55)
    np.testing.assert_allclose(s, [0.4, 0.65, 0.6, 0.55])
    for m, (a, b) in zip(merges, [(1, 2), (1, 3)]):
        assert m["alpha"] == pytest.approx(1 / (1 + np.exp(-2.0 * s[a] / (s[a] + s[b]))), rel=1e-12)
    last = plan_merges(S, 3, pair="last")
    assert [(m["into"], m["merged"]) for m in last] == [(2, 3), (1, 2), (0, 1)]


def test_npib_matches_sklearn_and_marks_opposite_entropies_nan():
    from sklearn.feature_selection import mutual_info_regression

    g = np.random.default_rng(0)
    wide, tight, other = g.normal(size=(40, 2)) * 50, g.normal(size=(40, 2)) * 1e-3, g.normal(size=(40, 2)) * 40
    sim = npib_matrix([wide, tight, other], neighbors=3, k=5, random_state=7)
    H = [-np.mean(np.log(5 / (40 * np.sort(np.linalg.norm(y[:, None] - y[None], axis=-1), 1)[:, 5] ** 2)))
         for y in (wide, tight, other)]
    np.testing.assert_allclose(sim.entropy, H, rtol=1e-10)
    assert H[0] > 0 > H[1] and H[2] > 0
    assert sim.nan_pairs == [(0, 1), (1, 2)] and np.isnan(sim.S[0, 1]) and np.isnan(sim.S[2, 1])
    mi = np.mean([mutual_info_regression(wide, other[:, c], n_neighbors=3, random_state=7).mean() for c in range(2)])
    assert sim.S[0, 2] == sim.S[2, 0] == pytest.approx(mi / np.sqrt(H[0] * H[2]), rel=1e-12)
    again = npib_matrix([wide, tight, other], neighbors=3, k=5, random_state=7)
    np.testing.assert_array_equal(np.nan_to_num(again.S, nan=-1), np.nan_to_num(sim.S, nan=-1))


# -- activations and points ------------------------------------------------------------------------
def test_activations_equal_output_hidden_states_real_tokens_first(tmp_path):
    model = build_tiny_model(tiny_llama_config(num_layers=3), seed=1)
    batches = random_batches(n_batches=2, batch_size=3, seq_len=12, seed=4)  # right padding
    left = {k: v.clone() for k, v in batches[1].items()}  # the same rows, left-padded
    for row in range(left["input_ids"].shape[0]):
        n = int(left["attention_mask"][row].sum())
        left["input_ids"][row] = torch.roll(left["input_ids"][row], 12 - n)
        left["attention_mask"][row] = torch.roll(left["attention_mask"][row], 12 - n)
    batches.append(left)
    for width in (12, 7):
        stat = PromptSequences([0, 1, 2], 32, width, tmp_path)
        collect(adapter_for(model), batches, [stat], progress=False)
        assert stat.count == 9
        for k in range(3):
            stored = stat.open(k)[:]
            row = 0
            for batch in batches:
                with torch.no_grad():
                    hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[k]
                for b in range(hidden.shape[0]):
                    real = hidden[b][batch["attention_mask"][b].bool()][:width]
                    expected = torch.zeros(width, 32)
                    expected[: real.shape[0]] = real
                    np.testing.assert_array_equal(stored[row], expected.numpy())
                    row += 1


def test_prompt_points_and_reference_points_against_explicit_distances():
    g = np.random.default_rng(1)
    sequences = g.normal(size=(6, 3, 4)).astype(np.float32)  # 6 sequences, 3 stored positions of 5, d = 4
    flat = np.concatenate([sequences, np.zeros((6, 2, 4), np.float32)], 1).reshape(6, -1).astype(np.float64)
    explicit = np.array([[np.sqrt(((a - b) ** 2).sum()) for b in flat] for a in flat])
    np.testing.assert_allclose(prompt_distances(sequences), explicit, rtol=1e-12, atol=1e-12)
    # reference: n = 6 <= 100, so tokens 0..5 of the sequences flattened to 5-position rows
    rows = np.stack([sequences[0, 0], sequences[0, 1], sequences[0, 2], np.zeros(4), np.zeros(4), sequences[1, 0]])
    np.testing.assert_array_equal(virtual_rows(sequences, 5, 0, 6), rows.astype(np.float32))
    rows = rows.astype(np.float64)
    explicit = np.array([[np.sqrt(((a - b) ** 2).sum()) for b in rows] for a in rows])
    np.testing.assert_allclose(reference_distances(sequences, 5), explicit, rtol=1e-12, atol=1e-12)


# -- whole prunes -----------------------------------------------------------------------------------
def _calibration(seed: int = 0) -> CalibrationData:
    return CalibrationData(random_batches(n_batches=13, batch_size=4, seq_len=10, seed=seed), 10)  # n = 52 > 50


def test_reference_merge_equals_reverse_order_pruning():
    data = _calibration()
    model = build_tiny_model(tiny_llama_config(num_layers=6), seed=2)
    baseline = copy.deepcopy(model)
    result = build_pruner("mka", {"merge": "reference"}).prune(adapter_for(model), data, 2, progress=False)
    build_pruner("last_layers").prune(adapter_for(baseline), data, 2, progress=False)
    assert result.removed_layers == [4, 5] and model.config.num_hidden_layers == 4
    for batch in data.batches:
        torch.testing.assert_close(model(**batch, use_cache=False).logits, baseline(**batch, use_cache=False).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"points": "reference", "pair": "most_similar_adjacent"}])
def test_merged_model_equals_a_rebuild_from_the_recorded_coefficients(options):
    data = _calibration(seed=1)
    model = build_tiny_llama64(num_layers=6, seed=4)
    rebuilt = copy.deepcopy(model)
    result = build_pruner("mka", options).prune(adapter_for(model), data, 3, progress=False)
    scores = result.selection.scores
    S = np.array(scores["S"], dtype=float)
    assert S.shape == (6, 6) and np.allclose(S, S.T, equal_nan=True) and scores["nan_count"] == np.isnan(
        S[np.triu_indices(6)]).sum()
    assert len(scores["merges"]) == 3 and all(0 < m["alpha"] < 1 for m in scores["merges"])
    assert all(len(v) == 3 and v[0] == pytest.approx(1.0) for v in scores["singular_values"])
    weights = {k: {n: rebuilt.model.layers[k].get_parameter(n).data.clone() for n in LINEAR} for k in range(6)}
    for m in scores["merges"]:
        a, b, alpha = m["into"], m["merged"], m["alpha"]
        weights[a] = {n: alpha * weights[a][n] + (1 - alpha) * weights[b][n] for n in LINEAR}
    for k, layer in enumerate(rebuilt.model.layers):
        for n in LINEAR:
            layer.get_parameter(n).data = weights[k][n]
    ModelSurgery(adapter_for(rebuilt)).remove_layers([m["merged"] for m in scores["merges"]])
    assert result.removed_layers == sorted(m["merged"] for m in scores["merges"])
    for batch in data.batches[:3]:
        torch.testing.assert_close(model(**batch, use_cache=False).logits, rebuilt(**batch, use_cache=False).logits,
                                   rtol=1e-10, atol=1e-12)


def test_too_few_samples_and_bad_options_fail_before_any_pass(counting_collect):
    model = build_tiny_model(tiny_llama_config(num_layers=4), seed=0)
    with pytest.raises(ConfigError, match=r"calibration.n_samples=12; allowed: at least 51"):
        build_pruner("mka").prune(adapter_for(model), CalibrationData(random_batches(), 16), 1, progress=False)
    for key, value in [("points", "token"), ("pair", "first"), ("alpha", "mean"), ("merge", "sum"),
                       ("positions", 0), ("beta", float("nan")), ("random_state", -1)]:
        with pytest.raises(ConfigError, match=f"mka {key}="):
            build_pruner("mka", {key: value})
    assert counting_collect == []


def test_too_few_calibration_sequences_are_refused_from_the_config_alone(tmp_path):
    """The run's config check (no weights read, nothing written) refuses MKA with n <= 50 sequences, naming the
    value and the minimum; scale=fast's MKA budget (conf/budget/pruner/fast_mka.yaml) passes it."""
    from depthbench.experiments.pipeline import validate

    with pytest.raises(ConfigError, match=r"calibration.n_samples=8; allowed: at least 51"):
        validate(compose("pruner=mka", "calibration.n_samples=8", "logger=none"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert compose("pruner=mka", "scale=fast").calibration.n_samples == 56

"""FinerCut against independent computations (METHODS-2026 section 9 (c)).

References written here: the divergences as float64 NumPy formulas (and the spec's one-token test vectors);
candidate models built as deep copies with ``o_proj`` / ``down_proj`` zeroed (the reference's masking), run
by their own full forward pass; the front-exclusion rule evaluated by hand; a brute-force greedy loop over
those models. Plus the declared scoring subset (``score_samples``) of every method that re-scores per
candidate, against a calibration set that holds only the first N sequences.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch

from depthbench import chunks
from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.divergence import divergence_rows, divergence_sum
from depthbench.calibration.masked_nll import masked_logits
from depthbench.calibration.service import CalibrationService
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.adapters.base import ModelAdapter
from depthbench.pruners import build_pruner
from depthbench.pruners.methods.finercut import candidate_pool
from depthbench.pruners.methods.llm_drop import candidate_units
from depthbench.selection.greedy import ranked_removal
from tests.helpers import REPO, build_tiny_llama64, random_batches
from tests.reference import nll_float64

pytestmark = pytest.mark.usefixtures("one_torch_thread")
L = 4
NAMES = [f"{k}.attn" for k in range(L)] + [f"{k}.mlp" for k in range(L)]  # the candidate order


# -- independent references ---------------------------------------------------------------------------
def np_divergence(p: np.ndarray, q: np.ndarray, kind: str) -> float:
    """d(P, Q) for one position, float64, from the definitions (0 log 0 = 0)."""
    def kl(a, b):
        return float(sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0))

    m = (p + q) / 2
    if kind == "kl":
        return kl(p, q)
    return 0.5 * (kl(p, m) + kl(q, m)) if kind == "js" else 0.5 * (kl(m, p) + kl(m, q))


def np_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_mean_divergence(dense: list[np.ndarray], pruned: list[np.ndarray], masks: list[np.ndarray], kind: str) -> float:
    """Mean over every real position (no label shift) of d(softmax dense, softmax pruned)."""
    values = []
    for a, b, mask in zip(dense, pruned, masks):
        for row, col in zip(*np.nonzero(mask)):
            values.append(np_divergence(np_softmax(a[row, col]), np_softmax(b[row, col]), kind))
    return float(np.mean(values))


def zeroed(model, units: list[str]):
    """A deep copy with each unit's output projection (o_proj / down_proj, weight and bias) set to zero."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name in units:
            k, part = name.split(".")
            layer = out.model.layers[int(k)]
            proj = layer.self_attn.o_proj if part == "attn" else layer.mlp.down_proj
            for p in proj.parameters():
                p.zero_()
    return out


@torch.no_grad()
def logits_of(model, batches) -> list[np.ndarray]:
    return [model(**b, use_cache=False).logits.to(torch.float64).numpy() for b in batches]


def tiny(seed: int = 5, layers: int = L):
    return build_tiny_llama64(num_layers=layers, seed=seed)


def data(n_batches: int = 2, batch_size: int = 3, seed: int = 3) -> CalibrationData:
    return CalibrationData(random_batches(n_batches=n_batches, batch_size=batch_size, seq_len=10, seed=seed), 10)


# -- divergences ----------------------------------------------------------------------------------------
def test_one_token_test_vectors():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    log_p, log_q = torch.from_numpy(np.log(p)[None]), torch.from_numpy(np.log(q)[None])
    d_ref = float(divergence_rows(log_p, log_q, "js_ref")[0])
    assert d_ref == pytest.approx(0.1179732, abs=5e-8) and d_ref / 2 == pytest.approx(0.0589866, abs=5e-8)
    assert float(divergence_rows(log_p, log_q, "js")[0]) == pytest.approx(0.1017492, abs=5e-8)
    for kind in ("js_ref", "js", "kl"):
        assert float(divergence_rows(log_p, log_q, kind)[0]) == pytest.approx(np_divergence(p, q, kind), rel=1e-12)


@pytest.mark.parametrize("kind", ["js_ref", "js", "kl"])
def test_mean_divergence_over_real_positions_matches_float64_formula(monkeypatch, kind):
    g = torch.Generator().manual_seed(0)
    dense, pruned = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g) * 2
    if kind != "js_ref":  # a token the dense model rules out: 0 log 0 = 0 where P weighs (js_ref's KL(M||P) is inf)
        dense[0, 2, 4] = -math.inf
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    pruned[2, 5] = math.nan  # a padding position's logits count for nothing, whatever they are
    monkeypatch.setattr(chunks, "CPU_CHUNK_BYTES", 11 * 8 * 4)  # chunks of 4 positions (float64 rows of 11)
    total, count = divergence_sum(dense, pruned.float(), mask, kind)
    want = np_mean_divergence([dense.double().numpy()], [pruned.float().double().numpy()], [mask.numpy()], kind)
    assert count == int(mask.sum()) == 15
    assert total / count == pytest.approx(want, rel=1e-12)
    assert divergence_sum(dense, dense, mask, kind)[0] == pytest.approx(0.0, abs=1e-15)  # D(P, P) = 0


# -- masked logits and the service ------------------------------------------------------------------------
@pytest.mark.parametrize("skip", [[], ["1.mlp"], ["0.attn", "2.mlp", "3.attn"]])
def test_masked_logits_equal_the_logits_with_zeroed_weights(skip):
    model, calibration = tiny(), data()
    adapter = adapter_for(model)
    batch = calibration.batches[0]
    got = masked_logits(adapter, batch, NAMES, skip=skip)
    mask = batch["attention_mask"].bool()
    for name in NAMES:
        want = logits_of(zeroed(model, [*skip, name]), [batch])[0]
        assert np.allclose(got[name].numpy()[mask.numpy()], want[mask.numpy()], rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize("kind", ["js_ref", "js", "kl"])
def test_masked_divergence_equals_divergence_of_zeroed_models_from_the_dense_one(kind):
    model, calibration = tiny(), data()
    service = CalibrationService(adapter_for(model), calibration, progress=False)
    masks = [b["attention_mask"].numpy() for b in calibration.batches]
    dense = logits_of(model, calibration.batches)
    skip = ["2.attn"]
    got = service.masked_divergence(NAMES, skip=skip, divergence=kind)
    assert list(got) == NAMES
    for name in NAMES:
        want = np_mean_divergence(dense, logits_of(zeroed(model, [*skip, name]), calibration.batches), masks, kind)
        assert got[name] == pytest.approx(want, rel=1e-9, abs=1e-14), name
    assert got["2.attn"] == pytest.approx(np_mean_divergence(dense, logits_of(zeroed(model, skip), calibration.batches),
                                                             masks, kind), rel=1e-9)


def test_a_zero_sub_block_has_d_zero_leaves_d_unchanged_and_is_picked_first():
    model = tiny()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.zero_()  # 2.mlp already computes nothing
    calibration = data()
    service = CalibrationService(adapter_for(model), calibration, progress=False)
    assert service.masked_divergence(["2.mlp"])["2.mlp"] == pytest.approx(0.0, abs=1e-14)  # D(empty) = 0
    with_s = service.masked_divergence(NAMES, skip=["3.attn"])
    assert with_s["2.mlp"] == pytest.approx(service.masked_divergence(["3.attn"])["3.attn"], rel=1e-12)

    result = build_pruner("finercut", {"exclude_front": 0.0, "score_samples": 0, "budget": "count",
                                       "n_modules": 2}).prune(adapter_for(model), calibration, 1, progress=False)
    scores = result.selection.scores
    assert scores["removed_in_order"][0] == "2.mlp" and scores["steps"][0]["D"] == pytest.approx(0.0, abs=1e-14)
    first, second = scores["rounds"][0]["candidates"], scores["rounds"][1]["candidates"]
    assert set(first) - {"2.mlp"} < set(second)  # layer 0 rejoined after the first pick (x = 0)
    for name, value in first.items():  # with 2.mlp gone nothing changes: D({2.mlp, c}) = D({c})
        if name != "2.mlp":
            assert second[name] == pytest.approx(value, rel=1e-10, abs=1e-15)


# -- the exclusion rule and the counting -------------------------------------------------------------------
def test_front_exclusion_at_32_layers():
    candidates = candidate_units(32, "joint")
    front = set(range(13))  # int(2 * 32 * 0.4 / 2) = int(12.8) = 12: layers 0..12, 26 sub-blocks
    for n_removed in range(26):  # int(2 * 32 * 0.4) + 1 = 26 removals before they rejoin
        pool = candidate_pool(candidates, 32, 0.4, n_removed)
        assert len(pool) == 64 - 26 and not front & {u.layer for u in pool}
        assert pool == [u for u in candidates if u.layer > 12]  # candidate order kept
    assert candidate_pool(candidates, 32, 0.4, 26) == candidates
    # x = 0 still withholds layer 0 for the first pick (int(0) = 0; rejoin after int(0) + 1 = 1)
    assert {u.layer for u in candidate_pool(candidates, 32, 0.0, 0)} == set(range(1, 32))
    assert candidate_pool(candidates, 32, 0.0, 1) == candidates


@pytest.fixture
def fake_divergence(monkeypatch):
    """CalibrationService.masked_divergence without passes: a fixed score per (candidate, prefix), the front
    layers scored lowest so that the exclusion is what keeps them out; every call recorded."""
    calls = []

    def fake(self, candidates, skip=(), divergence="js_ref", what=""):
        candidates = list(candidates)
        calls.append(([str(u) for u in skip], [str(u) for u in candidates]))
        return {u: 0.001 * u.layer + (0.0005 if u.part == "mlp" else 0.0) + 0.01 * len(skip) for u in candidates}

    monkeypatch.setattr(CalibrationService, "masked_divergence", fake)
    return calls


def test_first_26_picks_avoid_layers_0_to_12_and_k16_costs_488_evaluations(fake_divergence):
    model, calibration = tiny(layers=32), data(n_batches=1, batch_size=2)
    pruner = build_pruner("finercut", {"n_modules": 30, "score_samples": 0})
    result = pruner.prune(adapter_for(model), calibration, 1, progress=False)
    order = result.selection.scores["removed_in_order"]
    assert all(int(name.split(".")[0]) > 12 for name in order[:26])
    assert order[26] == "0.attn"  # rejoined; the lowest score now
    assert [len(c) for _, c in fake_divergence[:27]] == [38 - t for t in range(26)] + [64 - 26]

    fake_divergence.clear()
    k16 = build_pruner("finercut", {"n_modules": 16, "score_samples": 0}).prune(
        adapter_for(tiny(layers=32)), calibration, 1, progress=False)
    assert sum(len(c) for _, c in fake_divergence) == 488 == k16.selection.scores["evaluations"]
    assert sum(38 - t for t in range(16)) == 488 and k16.selection.scores["modules"] == 16
    fake_divergence.clear()
    x0 = build_pruner("finercut", {"n_modules": 16, "score_samples": 0, "exclude_front": 0.0}).prune(
        adapter_for(tiny(layers=32)), calibration, 1, progress=False)
    # x = 0 withholds layer 0 for the first pick: 2 evaluations fewer than 2LK - K(K-1)/2 = 904
    assert x0.selection.scores["evaluations"] == 62 + sum(64 - t for t in range(1, 16)) == 904 - 2


def test_one_shot_rounds_follow_the_reference():
    """L=4, x=0.4: layers 0-1 withheld (int(1.6) = 1) until int(3.2) + 1 = 4 removals. One shot scores the
    4 others once; once they are used up, the withheld 4 are scored once with those 4 removed."""
    candidates = candidate_units(L, "joint")
    calls = []

    def score(cands, chosen):
        calls.append((list(chosen), list(cands)))
        return {u: float(-u.layer) + (0.5 if u.part == "mlp" else 0.0) for u in cands}

    run = ranked_removal(lambda chosen: candidate_pool(candidates, L, 0.4, len(chosen)), score,
                         lambda chosen: len(chosen) >= 6, progress=False)
    assert [str(u) for u in run.order] == ["3.attn", "3.mlp", "2.attn", "2.mlp", "1.attn", "1.mlp"]
    assert [len(c) for _, c in calls] == [4, 4] and calls[1][0] == run.order[:4]
    assert run.evaluations == 8 and run.chosen_in_round == [0, 0, 0, 0, 1, 1]


# -- the greedy picks against brute force -------------------------------------------------------------------
def brute_force(model, calibration, kind: str, steps: int, x: float) -> tuple[list[str], list[float]]:
    """The greedy loop over full forward passes of zeroed copies, the pool written out from the rule."""
    masks = [b["attention_mask"].numpy() for b in calibration.batches]
    dense = logits_of(model, calibration.batches)
    chosen, values = [], []
    for _ in range(steps):
        withheld = set(range(int(2 * L * x / 2) + 1)) if len(chosen) < int(2 * L * x) + 1 else set()
        pool = [n for n in NAMES if n not in chosen and int(n.split(".")[0]) not in withheld]
        if kind == "ppl":
            score = {n: nll_float64(zeroed(model, chosen + [n]), calibration.batches) for n in pool}
        else:
            score = {n: np_mean_divergence(dense, logits_of(zeroed(model, chosen + [n]), calibration.batches), masks,
                                           kind) for n in pool}
        best = min(pool, key=lambda n: (score[n], pool.index(n)))
        chosen.append(best)
        values.append(score[best])
    return chosen, values


@pytest.mark.parametrize("kind, x", [("js_ref", 0.0), ("js", 0.4), ("kl", 0.0), ("ppl", 0.0)])
def test_greedy_picks_equal_a_brute_force_loop_of_full_passes(kind, x):
    model, calibration = tiny(seed=7), data(seed=4)
    want, values = brute_force(copy.deepcopy(model), calibration, kind, 3, x)
    result = build_pruner("finercut", {"divergence": kind, "exclude_front": x, "score_samples": 0, "n_modules": 3}
                          ).prune(adapter_for(model), calibration, 1, progress=False)
    scores = result.selection.scores
    assert scores["removed_in_order"] == want
    assert [s["D"] for s in scores["steps"]] == pytest.approx(values, rel=1e-9)
    assert scores["D"] == pytest.approx(values[-1], rel=1e-9)
    if kind != "ppl":
        assert scores["D_over_V"] == pytest.approx(values[-1] / 101, rel=1e-9)  # V = 101


def test_one_shot_takes_the_lowest_single_removals():
    model, calibration = tiny(seed=7), data(seed=4)
    masks = [b["attention_mask"].numpy() for b in calibration.batches]
    dense = logits_of(model, calibration.batches)
    pool = NAMES[1:4] + NAMES[5:]  # x = 0: layer 0 withheld for the one round
    single = {n: np_mean_divergence(dense, logits_of(zeroed(model, [n]), calibration.batches), masks, "js_ref")
              for n in pool}
    want = sorted(pool, key=lambda n: (single[n], pool.index(n)))[:3]
    result = build_pruner("finercut", {"mode": "one_shot", "exclude_front": 0.0, "score_samples": 0,
                                       "n_modules": 3}).prune(adapter_for(model), calibration, 1, progress=False)
    scores = result.selection.scores
    assert scores["removed_in_order"] == want and scores["evaluations"] == 6 and scores["D"] is None


# -- score_samples: the declared scoring subset -------------------------------------------------------------
METHODS = {"finercut": ({"exclude_front": 0.0, "n_modules": 2}, 1, "rounds"),
           "sleb": ({}, 2, "steps"),
           "blockpruner": ({"budget": "count", "n_modules": 2}, 1, "steps"),
           "shortened_ppl": ({"plus": False}, 2, "values")}


@pytest.mark.parametrize("method", list(METHODS))
def test_score_samples_scores_on_the_first_n_sequences(method):
    options, n_remove, key = METHODS[method]
    full = data(n_batches=3, batch_size=2, seed=8)  # 6 sequences; the first 3 cross a batch boundary
    first3 = CalibrationData([full.batches[0], {k: v[:1] for k, v in full.batches[1].items()}], 10)
    subset = build_pruner(method, {**options, "score_samples": 3}).prune(
        adapter_for(tiny(seed=2, layers=6)), full, n_remove, progress=False).selection.scores
    alone = build_pruner(method, {**options, "score_samples": 0}).prune(
        adapter_for(tiny(seed=2, layers=6)), first3, n_remove, progress=False).selection.scores
    everything = build_pruner(method, {**options, "score_samples": 0}).prune(
        adapter_for(tiny(seed=2, layers=6)), full, n_remove, progress=False).selection.scores
    assert subset[key] == alone[key] and subset[key] != everything[key]
    real = int(full.batches[0]["attention_mask"].sum() + full.batches[1]["attention_mask"][0].sum())
    assert (subset["scored_samples"], subset["scored_tokens"]) == (3, real)
    assert (everything["scored_samples"], everything["scored_tokens"]) == (6, full.n_tokens)


@pytest.mark.parametrize("method", list(METHODS))
def test_bad_score_samples_are_refused_naming_the_maximum(method):
    options, n_remove, _ = METHODS[method]
    with pytest.raises(ConfigError, match=rf"{method} score_samples=-1; allowed: 0 \(all"):
        build_pruner(method, {**options, "score_samples": -1})
    model = tiny(layers=6)
    with pytest.raises(ConfigError, match=rf"{method} score_samples=7: the calibration set holds 6 sequences; "
                                          r"allowed: 0 \(all\) or at most 6"):
        build_pruner(method, {**options, "score_samples": 7}).prune(adapter_for(model), data(n_batches=3, batch_size=2),
                                                                    n_remove, progress=False)


def test_finercut_defaults_to_ten_scoring_sequences_and_the_others_to_all():
    assert build_pruner("finercut").options.score_samples == 10
    for method in ("sleb", "blockpruner", "shortened_ppl"):
        assert build_pruner(method).options.score_samples == 0


# -- options ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"divergence": "hellinger"}, r"finercut divergence='hellinger'; allowed: js_ref, js, kl, ppl"),
    ({"mode": "beam"}, r"finercut mode='beam'; allowed: greedy, one_shot"),
    ({"exclude_front": 1.0}, r"finercut exclude_front=1.0; allowed: 0 <= exclude_front < 1"),
    ({"exclude_front": -0.1}, r"exclude_front=-0.1"),
    ({"budget": "layers"}, r"budget='layers'; allowed: count, params"),
    ({"budget": "params", "n_modules": 3}, r"n_modules=3 needs budget=count"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        build_pruner("finercut", options)


def test_a_front_exclusion_that_leaves_too_few_candidates_fails_before_any_pass(fake_divergence):
    # L=4, x=0.9: int(3.6) = 3, every layer withheld until int(7.2) + 1 = 8 removals
    with pytest.raises(ConfigError, match=r"exclude_front=0.9 withholds both sub-blocks of layers 0..3 of 4 until 8"):
        build_pruner("finercut", {"exclude_front": 0.9}).check_feasible(4, 1)
    # L=4, x=0.6: layers 0-2 withheld (int(2.4) = 2) until int(4.8) + 1 = 5; 2 others; K = 2R = 4 is too many
    with pytest.raises(ConfigError, match="only 2 other sub-blocks"):
        build_pruner("finercut", {"exclude_front": 0.6, "score_samples": 0}).prune(adapter_for(tiny()), data(), 2,
                                                                                   progress=False)
    assert fake_divergence == []


def test_an_adapter_without_single_layer_forward_scores_by_whole_passes():
    model, calibration = tiny(), data()
    adapter = adapter_for(model)

    class NoSingleLayers(type(adapter)):
        layer_forward = ModelAdapter.layer_forward  # the base's: not implemented

    walked = CalibrationService(adapter, calibration, progress=False).masked_divergence(NAMES, skip=["1.mlp"])
    whole = CalibrationService(NoSingleLayers(model), calibration, progress=False).masked_divergence(NAMES,
                                                                                                    skip=["1.mlp"])
    assert list(whole) == NAMES
    for name in NAMES:
        assert whole[name] == pytest.approx(walked[name], rel=1e-9, abs=1e-14)


def test_the_cost_script_counts_the_layer_runs_of_a_real_selection():
    """benchmarks/finercut_cost.py's counts (docs/PERFORMANCE.md) against decoder-layer calls counted by hooks
    during a real greedy selection on one batch (L=6, x=0.4: layers 0-2 withheld until 5 removals; K=6 makes
    them rejoin and may empty a layer)."""
    from depthbench.benchmarks import finercut_cost as cost

    model, calibration = tiny(seed=9, layers=6), data(n_batches=1)
    adapter = adapter_for(model)
    calls = []
    handles = [layer.register_forward_hook(lambda *args: calls.append(1)) for layer in adapter.decoder_layers()]
    heads = []
    handles.append(adapter.lm_head().register_forward_hook(lambda *args: heads.append(1)))
    try:
        scores = build_pruner("finercut", {"score_samples": 0, "n_modules": 6}).select(
            [], adapter, 1, CalibrationService(adapter, calibration, progress=False)).scores
    finally:
        for h in handles:
            h.remove()
    counted = cost.selection_cost(6, 0.4, scores["removed_in_order"])
    assert counted["evaluations"] == scores["evaluations"] == 6 + 5 + 4 + 3 + 2 + (12 - 5)
    assert counted["layer_runs"] == len(calls) and counted["heads"] == len(heads)
    assert counted["reference_layer_runs"] == 6 * (scores["evaluations"] + 1)
    # the committed record (docs/PERFORMANCE.md's FinerCut section) is what the script computes now
    assert json.loads((REPO / "docs" / "finercut_cost.json").read_text()) == cost.measure()

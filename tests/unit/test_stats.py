"""Intervals, paired significance and ranking on synthetic per-example results with a known answer."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from depthbench.errors import ConfigError
from depthbench.evaluation import stats
from depthbench.evaluation.retention import benchmark_intervals, retention_report


def _samples(correct, doc_ids=None):
    correct = [int(c) for c in correct]
    return {"doc_id": list(doc_ids if doc_ids is not None else range(len(correct))), "correct": correct}


def _method(rng, accuracy, n=400, tasks=("t1", "t2")):
    return {t: _samples(rng.random(n) < accuracy) for t in tasks}


def test_identical_methods_tie_with_p_one():
    rng = np.random.default_rng(0)
    a = _method(rng, 0.6)
    test = stats.values_test(stats.task_values(a), stats.task_values(a))
    assert test["p_value"] == 1.0 and test["difference"] == 0.0
    ranks, pairs = stats.rank_methods({"x": stats.task_values(a), "y": stats.task_values(a)})
    assert ranks == {"x": "1=", "y": "1="} and not pairs[0]["significant"]


def test_a_clearly_better_method_ranks_first_and_the_others_tie():
    rng = np.random.default_rng(1)
    good, weak = _method(rng, 0.85), _method(rng, 0.45)
    weak_twin = {t: dict(s) for t, s in weak.items()}
    values = {name: stats.task_values(t) for name, t in (("good", good), ("weak", weak), ("twin", weak_twin))}
    ranks, pairs = stats.rank_methods(values, iterations=2000)
    assert ranks == {"good": "1", "weak": "2=", "twin": "2="}
    by_pair = {(p["a"], p["b"]): p for p in pairs}
    assert by_pair[("good", "twin")]["significant"] and by_pair[("good", "weak")]["significant"]
    assert not by_pair[("twin", "weak")]["significant"]


def test_one_task_randomisation_test_matches_mcnemar_exact():
    """On one task only discordant pairs count: the sign-flip test is McNemar's exact binomial test."""
    a = [1] * 30 + [0] * 12 + [1] * 50 + [0] * 50  # 30 a-only right, 12 b-only right, 100 concordant
    b = [0] * 30 + [1] * 12 + [1] * 50 + [0] * 50
    test = stats.values_test(stats.task_values({"t": _samples(a)}), stats.task_values({"t": _samples(b)}),
                             iterations=40000, seed=3)
    exact = binomtest(30, 42, 0.5).pvalue
    assert test["discordant"] == 42
    assert test["p_value"] == pytest.approx(exact, abs=0.004)
    assert test["difference"] == pytest.approx((30 - 12) / 142)


def test_holm_adjustment_by_hand():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04; monotone max)
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_bootstrap_intervals_cover_the_estimate_with_binomial_width():
    rng = np.random.default_rng(2)
    n = 2000
    base = {"t": _samples(rng.random(n) < 0.6)}
    pruned = {"t": _samples(rng.random(n) < 0.5)}
    out = stats.bootstrap_intervals(base, pruned, iterations=4000, seed=0)
    p = np.mean(base["t"]["correct"])
    lo, hi = out["base_average"]
    assert lo < p < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.15)
    q = np.mean(pruned["t"]["correct"])
    rlo, rhi = out["retention_average_percent"]
    assert rlo < 100 * q / p < rhi


def test_retention_report_adds_intervals_only_with_per_example_results():
    rng = np.random.default_rng(4)
    tasks = {}
    for name in ("a", "b"):
        tasks[name] = (_samples(rng.random(200) < 0.7), _samples(rng.random(200) < 0.6))
    base = {"tasks": {k: float(np.mean(v[0]["correct"])) for k, v in tasks.items()},
            "benchmark": {"tasks": {k: {"samples": v[0]} for k, v in tasks.items()}}}
    pruned = {"tasks": {k: float(np.mean(v[1]["correct"])) for k, v in tasks.items()},
              "benchmark": {"tasks": {k: {"samples": v[1]} for k, v in tasks.items()}}}
    report = retention_report(base, pruned)
    lo, hi = report["intervals"]["retention_average_percent"]
    assert lo < report["average_percent"] < hi
    without = {"tasks": base["tasks"], "benchmark": {"tasks": {k: {} for k in tasks}}}
    assert retention_report(without, pruned)["intervals"] is None
    assert benchmark_intervals(None, pruned["benchmark"]) is None


def test_task_values_sum_to_the_average_task_accuracy():
    rng = np.random.default_rng(5)
    tasks = {"t1": _samples(rng.random(30) < 0.5), "t2": _samples(rng.random(70) < 0.8)}
    expected = (np.mean(tasks["t1"]["correct"]) + np.mean(tasks["t2"]["correct"])) / 2
    assert sum(stats.task_values(tasks).values()) == pytest.approx(expected, abs=1e-12)


def _windows(per_window_kl, tokens):
    return {"window": list(range(len(tokens))), "tokens": list(tokens), "kl": list(per_window_kl)}


def test_window_test_is_the_exact_sign_flip_distribution_over_windows():
    """Per-window KL sums of two methods on the same 8 windows: the p-value equals the exact two-sided
    sign-flip p over the 2^8 sign patterns (enumerated here), up to Monte Carlo error; lower KL ranks first."""
    import itertools

    tokens = [30, 32, 28, 31, 30, 29, 33, 27]
    a = np.array([3.0, 2.5, 2.8, 3.1, 2.9, 2.7, 3.3, 2.6])  # per-window KL sums
    b = a + np.array([0.9, 0.4, -0.1, 0.7, 0.5, 0.8, 0.2, 0.6])
    va, vb = stats.window_values(_windows(a, tokens), "kl"), stats.window_values(_windows(b, tokens), "kl")
    assert sum(va.values()) == pytest.approx(a.sum() / sum(tokens))
    d = (a - b) / sum(tokens)
    exact = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) - 1e-15 for s in itertools.product((-1, 1), repeat=8)])
    test = stats.values_test(va, vb, iterations=40000, seed=1)
    assert test["p_value"] == pytest.approx(exact, abs=0.004) and test["difference"] == pytest.approx(d.sum())
    ranks, pairs = stats.rank_methods({"a": va, "b": vb}, higher_is_better=False, iterations=4000)
    assert pairs[0]["a"] == "a" and pairs[0]["difference"] < 0


def test_pooled_seeds_are_the_unit_means_and_refuse_different_units():
    one, two = {1: 0.2, 2: 0.4}, {1: 0.4, 2: 0.0}
    assert stats.pooled([one, two]) == {1: pytest.approx(0.3), 2: pytest.approx(0.2)}
    with pytest.raises(ConfigError, match="different examples or windows"):
        stats.pooled([one, {1: 0.1, 3: 0.2}])

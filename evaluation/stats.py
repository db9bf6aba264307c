"""Confidence intervals and paired significance from per-example results.

Per-example results are ``{"doc_id": [...], "correct": [0/1, ...]}`` (optionally ``"subtask"``) for a
task's headline metric, as `depthbench.evaluation.lm_eval_runner` records them.

- Intervals (`bootstrap_intervals`): 95% percentile intervals from a paired bootstrap over examples:
  each replicate resamples, independently per task, the task's examples with replacement and uses the
  same resampled examples for the base and the pruned model; the average is the mean of the task
  scores, retention the mean of the per-task ratios pruned / base (as `retention.retention`).
- Paired comparison (`paired_test`): a two-sided randomisation (sign-flip) test on the difference of
  the average-task accuracy: under "the two methods are exchangeable on every example" each example's
  pair of outcomes is swapped with probability 1/2. For one task this is McNemar's exact test (only
  discordant examples matter). p = (1 + #{|T*| >= |T|}) / (1 + B).
- Ranking (`rank_methods`): the p-values of all pairs in a group (same model, ratio, benchmark) are
  Holm-corrected; a method's rank is 1 + the number of methods significantly better than it
  (adjusted p < alpha and a higher average); methods that share a rank are marked with '='.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from depthbench.errors import ConfigError
from depthbench.evaluation.fidelity import paired_correctness

CONFIDENCE = 0.95


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _percentile_interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.quantile(values, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return [float(lo), float(hi)]


def _bootstrap_means(correct: np.ndarray, index: np.ndarray) -> np.ndarray:
    return correct[index].astype(np.float64).mean(axis=1)


def bootstrap_intervals(base_tasks: Mapping[str, Mapping], pruned_tasks: Mapping[str, Mapping],
                        iterations: int = 2000, seed: int = 0) -> dict | None:
    """95% intervals of the base and pruned average, their difference and the average retention (%).

    ``*_tasks`` map task -> per-example samples. None when a task has no per-example results."""
    if set(base_tasks) != set(pruned_tasks) or not base_tasks:
        raise ConfigError("bootstrap needs per-example results of the same tasks for both models")
    rng = _rng(seed)
    base_means, pruned_means = [], []
    for task in sorted(base_tasks):
        b, p = paired_correctness(base_tasks[task], pruned_tasks[task])
        if len(b) == 0:
            return None
        index = rng.integers(0, len(b), size=(iterations, len(b)))
        base_means.append(_bootstrap_means(b, index))
        pruned_means.append(_bootstrap_means(p, index))
    base_m, pruned_m = np.stack(base_means, 1), np.stack(pruned_means, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(base_m > 0, pruned_m / base_m, np.nan)
    retention = 100.0 * np.nanmean(ratios, axis=1) if np.isfinite(ratios).any() else np.full(iterations, np.nan)
    return {
        "method": f"paired bootstrap over examples ({iterations} replicates, seed {seed}), percentile intervals",
        "confidence": CONFIDENCE,
        "base_average": _percentile_interval(base_m.mean(1)),
        "pruned_average": _percentile_interval(pruned_m.mean(1)),
        "average_difference": _percentile_interval(pruned_m.mean(1) - base_m.mean(1)),
        "retention_average_percent": _percentile_interval(retention),
    }


def _paired_differences(a_tasks: Mapping[str, Mapping], b_tasks: Mapping[str, Mapping]) -> list[np.ndarray]:
    if set(a_tasks) != set(b_tasks) or not a_tasks:
        raise ConfigError("a paired comparison needs per-example results of the same tasks for both methods")
    out = []
    for task in sorted(a_tasks):
        a, b = paired_correctness(a_tasks[task], b_tasks[task])
        if len(a) == 0:
            raise ConfigError(f"task {task!r}: the two methods share no evaluated example")
        out.append((a.astype(np.float64) - b) / len(a))  # contribution of each example to the task mean
    return out


def paired_test(a_tasks: Mapping[str, Mapping], b_tasks: Mapping[str, Mapping], iterations: int = 10000,
                seed: int = 0) -> dict:
    """Sign-flip randomisation test of "A and B have the same average-task accuracy" (two-sided)."""
    diffs = _paired_differences(a_tasks, b_tasks)
    n_tasks = len(diffs)
    observed = sum(float(d.sum()) for d in diffs) / n_tasks
    discordant = np.concatenate([d[d != 0] for d in diffs]) / n_tasks
    if discordant.size == 0:
        return {"difference": observed, "p_value": 1.0, "discordant": 0, "iterations": iterations}
    rng = _rng(seed)
    exceed = 0
    for start in range(0, iterations, 1000):
        size = min(1000, iterations - start)
        signs = rng.integers(0, 2, size=(size, discordant.size), dtype=np.int8) * 2 - 1
        stats = signs @ discordant
        exceed += int((np.abs(stats) >= abs(observed) - 1e-12).sum())
    return {"difference": observed, "p_value": (1 + exceed) / (1 + iterations), "discordant": int(discordant.size),
            "iterations": iterations}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def rank_methods(scores: Mapping[str, float], samples: Mapping[str, Mapping[str, Mapping]], alpha: float = 0.05,
                 iterations: int = 10000, seed: int = 0) -> tuple[dict[str, str], list[dict]]:
    """Ranks with ties (``{"m": "1", "n": "2=", ...}``) and the pairwise table (one dict per pair).

    ``scores``: each method's average-task accuracy; ``samples``: method -> task -> per-example results."""
    names = sorted(scores, key=lambda m: (-scores[m], m))
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            test = paired_test(samples[a], samples[b], iterations=iterations, seed=seed)
            pairs.append({"a": a, "b": b, **test})
    for pair, adj in zip(pairs, holm([p["p_value"] for p in pairs])):
        pair["p_holm"] = adj
        pair["significant"] = adj < alpha
    better = {m: 0 for m in names}
    for pair in pairs:
        if pair["significant"]:
            loser = pair["b"] if pair["difference"] > 0 else pair["a"]
            better[loser] += 1
    ranks = {m: 1 + better[m] for m in names}
    counts = {r: sum(1 for v in ranks.values() if v == r) for r in ranks.values()}
    return {m: f"{r}=" if counts[r] > 1 else str(r) for m, r in ranks.items()}, pairs

"""Confidence intervals and paired significance from per-example results.

Per-example results are ``{"doc_id": [...], "correct": [0/1, ...]}`` (optionally ``"subtask"``) for a
task's headline metric, as `depthbench.evaluation.lm_eval_runner` records them.

- Intervals (`bootstrap_intervals`): 95% percentile intervals from a paired bootstrap over examples:
  each replicate resamples, independently per task, the task's examples with replacement and uses the
  same resampled examples for the base and the pruned model; the average is the mean of the task
  scores, retention the mean of the per-task ratios pruned / base (as `retention.retention`).
- Paired comparison (`values_test`): a two-sided randomisation (sign-flip) test on the difference of
  a metric written as unit values: under "the two methods are exchangeable on every unit" each unit's
  pair of values is swapped with probability 1/2. On one task's examples this is McNemar's exact test
  (only discordant examples matter). p = (1 + #{|T*| >= |T|}) / (1 + B).
- Unit values (`task_values`, `window_values`): a metric written as a sum over paired units, examples
  (the average-task accuracy) or held-out windows (KL to the dense model, NLL per token, top-1
  agreement: a window's tokens stay together, as in the window-clustered standard error); `pooled`
  averages the seeds of one method unit by unit, so a method run with several seeds is one competitor.
- Ranking (`rank_methods`): every pair of competitors is compared by the sign-flip test on their unit
  differences (`values_test`), the p-values of all pairs in a group are Holm-corrected; a competitor's
  rank is 1 + the number of competitors significantly better than it (adjusted p < alpha); competitors
  that share a rank are marked with '='.
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


def _sign_flip(differences: np.ndarray, iterations: int, seed: int) -> dict:
    """Two-sided sign-flip randomisation test of "the units' differences are symmetric about 0": each unit's
    difference keeps or flips its sign with probability 1/2; the statistic is their sum. Units with a zero
    difference cannot change it and are left out (``discordant`` counts the others)."""
    observed = float(differences.sum())
    discordant = differences[differences != 0]
    if discordant.size == 0:
        return {"difference": observed, "p_value": 1.0, "discordant": 0, "iterations": iterations}
    rng = _rng(seed)
    exceed = 0
    tolerance = 1e-12 * max(1.0, float(np.abs(discordant).sum()))
    for start in range(0, iterations, 1000):
        size = min(1000, iterations - start)
        signs = rng.integers(0, 2, size=(size, discordant.size), dtype=np.int8) * 2 - 1
        exceed += int((np.abs(signs @ discordant) >= abs(observed) - tolerance).sum())
    return {"difference": observed, "p_value": (1 + exceed) / (1 + iterations), "discordant": int(discordant.size),
            "iterations": iterations}


# ------------------------------------------------------------------------------------------------
# Unit values: a metric written as a sum over paired units (examples or held-out windows), so that two
# models (or the pooled seeds of one method) compare unit by unit.

def task_values(tasks: Mapping[str, Mapping]) -> dict:
    """``(task, example) -> correct / (examples of the task x tasks)``: they sum to the average-task accuracy."""
    from depthbench.evaluation.fidelity import example_keys

    out = {}
    for task in sorted(tasks):
        samples = tasks[task]
        keys = example_keys(samples)
        if len(set(keys)) != len(keys) or len(keys) != len(samples["correct"]) or not keys:
            raise ConfigError(f"task {task!r}: per-example results are empty, repeat an example or differ in length")
        for key, correct in zip(keys, samples["correct"]):
            out[(task, key)] = float(correct) / (len(keys) * len(tasks))
    return out


def window_values(per_window: Mapping[str, list], metric: str) -> dict:
    """``window -> that window's sum of ``metric`` / all tokens``: they sum to the token mean (the KL, the NLL
    per token = log perplexity, or the top-1 agreement), and a window's tokens stay together (clustered)."""
    if metric not in per_window:
        raise ConfigError(f"per-window results have no {metric!r}; they hold {sorted(per_window)}")
    total = float(sum(per_window["tokens"]))
    return {int(w): float(v) / total for w, v in zip(per_window["window"], per_window[metric])}


def pooled(values: Sequence[Mapping]) -> dict:
    """The mean over runs (the seeds of one method) of their unit values; the runs must share their units."""
    keys = set(values[0])
    if any(set(v) != keys for v in values[1:]):
        raise ConfigError("the seeds of one method were evaluated on different examples or windows: they cannot be "
                          "pooled (use the same benchmark and held-out settings for every seed)")
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def values_test(a: Mapping, b: Mapping, iterations: int = 10000, seed: int = 0) -> dict:
    """Paired sign-flip test of two unit-value maps over the same units (difference = sum a - sum b)."""
    if set(a) != set(b):
        raise ConfigError("a paired comparison needs results on the same examples or windows for both methods")
    keys = sorted(a, key=repr)
    return _sign_flip(np.array([a[k] - b[k] for k in keys], dtype=np.float64), iterations, seed)


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


def rank_methods(values: Mapping[str, Mapping], higher_is_better: bool = True, alpha: float = 0.05,
                 iterations: int = 10000, seed: int = 0) -> tuple[dict[str, str], list[dict]]:
    """Ranks with ties (``{"m": "1", "n": "2=", ...}``) and the pairwise table (one dict per pair, ``a`` the
    better of the two by its point estimate, ``difference`` = metric(a) - metric(b)).

    ``values``: competitor -> unit values (`task_values`, `window_values`, or `pooled` over seeds); the metric
    is their sum. Pairs are compared by `values_test`, p-values Holm-corrected over all pairs; a competitor's
    rank is 1 + the number of competitors significantly better than it."""
    scores = {m: float(sum(v.values())) for m, v in values.items()}
    sign = -1.0 if higher_is_better else 1.0
    names = sorted(scores, key=lambda m: (sign * scores[m], m))
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            test = values_test(values[a], values[b], iterations=iterations, seed=seed)
            pairs.append({"a": a, "b": b, **test})
    for pair, adj in zip(pairs, holm([p["p_value"] for p in pairs])):
        pair["p_holm"] = adj
        pair["significant"] = adj < alpha and pair["difference"] != 0
    better = {m: 0 for m in names}
    for pair in pairs:
        if pair["significant"]:
            better[pair["b"]] += 1
    ranks = {m: 1 + better[m] for m in names}
    counts = {r: sum(1 for v in ranks.values() if v == r) for r in ranks.values()}
    return {m: f"{r}=" if counts[r] > 1 else str(r) for m, r in ranks.items()}, pairs

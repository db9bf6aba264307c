"""Retention: how much of the base model's score a pruned model keeps, per task and on average.

As the ReplaceMe paper reports it: each task's metric divided by the base model's on the same task,
and the mean of those ratios in percent. The ratio of the two average scores is reported as well
(it weights tasks by their score rather than equally).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from depthbench.errors import ConfigError


def _values(metrics: Mapping) -> dict[str, float]:
    """Accept an `evaluate_benchmark` result, its ``tasks`` mapping, or a plain ``{task: value}``."""
    if "tasks" in metrics and isinstance(metrics["tasks"], Mapping):
        metrics = metrics["tasks"]
    out = {}
    for task, value in metrics.items():
        if isinstance(value, Mapping):
            value = value["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"metric for task {task!r} is {value!r}; a finite number is required")
        out[task] = float(value)
    return out


def retention(base_metrics: Mapping, pruned_metrics: Mapping) -> dict:
    """Per-task ``pruned / base`` and the average retention in percent over the tasks both share.

    A task whose base score is 0 has no defined retention (``None``) and is left out of the average.
    Both inputs must cover the same tasks; a mismatch is an error (it would silently bias the mean).
    """
    base, pruned = _values(base_metrics), _values(pruned_metrics)
    if set(base) != set(pruned):
        missing = sorted(set(base) ^ set(pruned))
        raise ConfigError(f"base and pruned results cover different tasks; only in one of them: {', '.join(missing)}")
    if not base:
        raise ConfigError("no tasks to compute retention on")
    per_task: dict[str, float | None] = {}
    for task in base:
        per_task[task] = pruned[task] / base[task] if base[task] != 0 else None
    defined = [r for r in per_task.values() if r is not None]
    base_avg = sum(base.values()) / len(base)
    pruned_avg = sum(pruned.values()) / len(pruned)
    return {
        "per_task": per_task,
        "average_percent": 100.0 * sum(defined) / len(defined) if defined else None,
        "ratio_of_averages_percent": 100.0 * pruned_avg / base_avg if base_avg != 0 else None,
        "base_average": base_avg,
        "pruned_average": pruned_avg,
        "tasks": len(base),
    }


def benchmark_intervals(base_benchmark: Mapping | None, pruned_benchmark: Mapping | None, seed: int = 0) -> dict | None:
    """95% paired-bootstrap intervals (`depthbench.evaluation.stats.bootstrap_intervals`) of the averages,
    their difference and the average retention, from the tasks' per-example results; None without them."""
    from depthbench.evaluation.stats import bootstrap_intervals

    if not base_benchmark or not pruned_benchmark:
        return None
    base_tasks, pruned_tasks = base_benchmark.get("tasks") or {}, pruned_benchmark.get("tasks") or {}
    if set(base_tasks) != set(pruned_tasks) or not base_tasks:
        return None
    if not all(t.get("samples") for t in list(base_tasks.values()) + list(pruned_tasks.values())):
        return None
    return bootstrap_intervals({k: v["samples"] for k, v in base_tasks.items()},
                               {k: v["samples"] for k, v in pruned_tasks.items()}, seed=seed)


def retention_report(base_quality: Mapping, pruned_quality: Mapping) -> dict:
    """`retention` of the task scores plus ``intervals`` (None when per-example results are missing)."""
    out = retention(base_quality["tasks"], pruned_quality["tasks"])
    out["intervals"] = benchmark_intervals(base_quality.get("benchmark"), pruned_quality.get("benchmark"))
    return out

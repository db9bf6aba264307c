"""Ranks on a declared primary metric, within groups of runs that removed the same amount.

``rank_by`` names the metric (`RANK_BY`, or one task of the benchmark):

- ``kl`` (the default): KL(dense || pruned) per token on the held-out windows; ``perplexity``: the
  pruned model's NLL per token there (log perplexity); ``top1``: its top-1 agreement with the dense
  model. Each is a sum over held-out windows of the window's share (`depthbench.evaluation.stats.
  window_values`), so two methods, evaluated on the same windows, compare window by window: tokens of
  one window stay together, as in the window-clustered standard error of ``kl_se``.
- ``tasks``: the average-task accuracy, per example; or ``<task>``: one task's accuracy, or for a gold-solution
  task its bits per byte (lower is better; a document's bits / all bytes per unit, `depthbench.evaluation.
  gold_bpb.unit_values`). Which way a metric points: `depthbench.evaluation.metric_direction`.

Competitors: the runs of one seed group (`depthbench.experiments.records.seed_group`: the config without
its seeds) are ONE competitor, ranked on the mean over its seeds of each unit's value; so a method's rank
never depends on how many seeds another method ran.

Groups: competitors are compared only with those of the same model, healing, and units (the same
held-out windows of the same text and settings, or the same examples), and at the same achieved
compression: sorted by the decoder layer-equivalents they removed (removed parameters without
embeddings / one layer's), a new group starts where a competitor removed more than ``tolerance``
layer-equivalents beyond the group's first. The group is named by what it removed (``compared_at``).
A competitor whose group is not the one most competitors
at its nominal ratio fell in (e.g. LLM-Drop's 8 attention blocks, 2 layer-equivalents, in a sweep at
25% = 8 layers) is ranked in its own group and marked ``†``, not as an equal of the others.

Within a group every pair is compared by the paired sign-flip test over units, p-values Holm-corrected
within the group; rank = 1 + the competitors significantly better (adjusted p < ``alpha``); ``=`` marks
a shared rank; a competitor alone in its group ranks 1.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from depthbench.errors import ConfigError
from depthbench.evaluation import gold_bpb, stats
from depthbench.evaluation.metric_direction import higher_is_better
from depthbench.experiments.records import (final_fidelity, final_task_results, healing_key, module_columns,
                                            per_example, seed_group, short_task_name)

#: rank_by -> (per-window metric or None for tasks, higher is better, what the Markdown calls it)
RANK_BY = {
    "kl": ("kl", higher_is_better("kl"), "KL(dense || pruned) per token on the held-out windows"),
    "perplexity": ("nll", higher_is_better("nll"), "the held-out NLL per token (log perplexity)"),
    "top1": ("top1", higher_is_better("top1"), "top-1 agreement with the dense model on the held-out windows"),
    "tasks": (None, higher_is_better("acc"), "the average-task accuracy"),
}
DEFAULT_RANK_BY = "kl"
#: Layer-equivalents within which two runs count as having removed the same amount.
TOLERANCE = 0.5
ALPHA = 0.05
OFF_RATIO = "†"


@dataclass
class Ranking:
    """Ranks (config hash -> ``"1"``, ``"2="``, ``"1†"``), each run's comparison group and the pairwise tests."""

    rank_by: str
    tolerance: float = TOLERANCE
    alpha: float = ALPHA
    task_metric: str = "acc"  # the metric of the task rank_by names (when it names one)
    ranks: dict[str, str] = field(default_factory=dict)
    compared_at: dict[str, str] = field(default_factory=dict)
    pairs: list[dict] = field(default_factory=list)

    @property
    def description(self) -> str:
        metric = RANK_BY[self.rank_by][2] if self.rank_by in RANK_BY else f"the accuracy on task {self.rank_by}"
        if self.rank_by not in RANK_BY and not higher_is_better(self.task_metric):
            metric = f"the {self.task_metric} on task {self.rank_by} (lower is better)"
        units = "held-out windows" if self._per_window else "examples"
        return (f"Ranked by {metric}, with a paired sign-flip randomisation test over {units}, Holm-corrected "
                "within each model x healing x achieved-compression group (`compared_at`; within "
                f"{self.tolerance:g} layer-equivalents); rank = 1 + methods significantly better (adjusted p < "
                f"{self.alpha:g}); seeds of one method pooled into one competitor; {OFF_RATIO} = removed a "
                "different amount than the others at its nominal ratio, so ranked in its own group.")

    @property
    def _per_window(self) -> bool:
        return RANK_BY.get(self.rank_by, (None,))[0] is not None


def _task_names(records: list[dict]) -> set[str]:
    names = set()
    for r in records:
        for task in (t for t, result in final_task_results(r).items() if result.get("samples")):
            names |= {task, short_task_name(task)}
    return names


def task_metric(rank_by: str, records: list[dict]) -> str:
    """The headline metric of the task ``rank_by`` names (``acc`` where no record has it)."""
    for r in records:
        for task, result in final_task_results(r).items():
            if rank_by in (task, short_task_name(task)) and result.get("metric"):
                return result["metric"]
    return "acc"


def check_rank_by(rank_by: str, records: list[dict]) -> str:
    """``rank_by`` if it names a metric or a task of these records, else a ConfigError naming what is allowed."""
    tasks = _task_names(records)
    if rank_by in RANK_BY or rank_by in tasks:
        return rank_by
    allowed = ", ".join(list(RANK_BY) + sorted(t for t in tasks if t == short_task_name(t)))
    raise ConfigError(f"rank_by={rank_by!r} is not a metric or a task of these runs; allowed: {allowed}")


def unit_values(record: dict, rank_by: str) -> dict | None:
    """The run's metric as unit values (`depthbench.evaluation.stats`), of the model it ends with; None where
    the run did not measure it per unit."""
    window_metric = RANK_BY.get(rank_by, (None,))[0]
    if window_metric is not None:
        per_window = final_fidelity(record).get("per_window")
        if not per_window or window_metric not in per_window:
            return None
        return stats.window_values(per_window, window_metric)
    if rank_by == "tasks":
        tasks = per_example(record)
        return stats.task_values(tasks) if tasks else None
    found = {t: r for t, r in final_task_results(record).items() if rank_by in (t, short_task_name(t))}
    if len(found) != 1 or not next(iter(found.values())).get("samples"):
        return None
    (task, result), = found.items()
    if result.get("metric") == gold_bpb.METRIC:
        return gold_bpb.unit_values(result["samples"])
    return stats.task_values({task: result["samples"]})


def _units_signature(record: dict, values: dict, rank_by: str) -> str:
    """What must be equal for two runs to be paired unit by unit: the units, and for held-out windows the text
    they were cut from (the evaluation settings and each window's token count: window ids alone repeat on any
    text)."""
    text = None
    if RANK_BY.get(rank_by, (None,))[0] is not None:
        evaluation = (record.get("config") or {}).get("evaluation") or {}
        text = (json.dumps(evaluation.get("perplexity"), sort_keys=True, default=str),
                final_fidelity(record)["per_window"]["tokens"])
    return hashlib.sha256(repr((sorted(map(repr, values)), text)).encode()).hexdigest()[:12]


def _equivalents(record: dict) -> float | None:
    return module_columns(record["pruning"])["layer_equivalents"]


def compression_groups(equivalents: dict[str, float | None], tolerance: float = TOLERANCE) -> dict[str, str]:
    """competitor -> group label: sorted by layer-equivalents removed, a group starts where one removed more than
    ``tolerance`` beyond the group's first; competitors without the count form one group of their own."""
    known = sorted((eq, name) for name, eq in equivalents.items() if eq is not None)
    clusters: list[list[tuple[float, str]]] = []
    for eq, name in known:
        if clusters and eq - clusters[-1][0][0] <= tolerance:
            clusters[-1].append((eq, name))
        else:
            clusters.append([(eq, name)])
    out = {name: "layer-equivalents unknown" for name, eq in equivalents.items() if eq is None}
    for cluster in clusters:
        lo, hi = cluster[0][0], cluster[-1][0]
        label = f"{lo:.2f} L-eq" if hi - lo < 0.005 else f"{lo:.2f}-{hi:.2f} L-eq"
        out.update({name: label for _, name in cluster})
    return out


def _labels(members: dict[str, list[dict]]) -> dict[str, str]:
    """competitor (seed group) -> its name in the pairwise table: the method, ``(n seeds)`` where pooled,
    ``#<hash>`` where two competitors of a group share a method."""
    methods = Counter(runs[0]["method"] for runs in members.values())
    out = {}
    for key, runs in members.items():
        name = runs[0]["method"]
        if methods[name] > 1:
            name += f"#{key[:6]}"
        out[key] = name + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
    return out


def rank_groups(records: list[dict], rank_by: str = DEFAULT_RANK_BY, tolerance: float = TOLERANCE,
                alpha: float = ALPHA) -> Ranking:
    """Rank every run that measured ``rank_by`` (see the module docstring)."""
    rank_by = check_rank_by(rank_by, records)
    metric = task_metric(rank_by, records) if rank_by not in RANK_BY else "acc"
    higher = RANK_BY[rank_by][1] if rank_by in RANK_BY else higher_is_better(metric)
    ranking = Ranking(rank_by, tolerance, alpha, task_metric=metric)
    sets: dict[tuple, dict[str, list[dict]]] = {}
    values: dict[str, dict] = {}
    for r in records:
        v = unit_values(r, rank_by)
        if v is None:
            continue
        values[r["config_hash"]] = v
        key = (r["model"]["name"], healing_key(r), _units_signature(r, v, rank_by))
        sets.setdefault(key, {}).setdefault(seed_group(r), []).append(r)
    for (model, healing, _), competitors in sorted(sets.items(), key=lambda kv: str(kv[0])):
        groups = compression_groups({k: _mean([_equivalents(r) for r in runs]) for k, runs in competitors.items()},
                                    tolerance)
        usual = {}  # nominal ratio -> the group most of its competitors fell in
        for ratio in {runs[0]["ratio"] for runs in competitors.values()}:
            counts = Counter(groups[k] for k, runs in competitors.items() if runs[0]["ratio"] == ratio)
            usual[ratio] = max(sorted(counts), key=counts.get)
        for label in sorted(set(groups.values())):
            members = {k: runs for k, runs in competitors.items() if groups[k] == label}
            names = _labels(members)
            pooled = {names[k]: stats.pooled([values[r["config_hash"]] for r in runs]) for k, runs in members.items()}
            group_ranks, group_pairs = stats.rank_methods(pooled, higher_is_better=higher, alpha=alpha)  # alone: "1"
            ranking.pairs += [{"model": model, "compared_at": label, "healing": healing, "metric": rank_by, **p}
                              for p in group_pairs]
            for k, runs in members.items():
                mark = OFF_RATIO if usual[runs[0]["ratio"]] != label else ""
                for r in runs:
                    ranking.ranks[r["config_hash"]] = group_ranks[names[k]] + mark
                    ranking.compared_at[r["config_hash"]] = label
    return ranking


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)

"""Aggregate result records into a leaderboard (CSV + Markdown) and plots.

``depthbench-leaderboard DIR [DIR ...]`` loads every ``result.json`` under the given run or sweep
directories into a pandas DataFrame, one row per distinct run config (model x method x ratio x
whatever else differs), and writes into the first DIR: ``leaderboard.csv``, ``leaderboard.md`` and
``plots/*.png``. Rows are keyed by config hash, so aggregating twice, or a resumed sweep, never
duplicates a row.

Ranking (`depthbench.experiments.ranking`): on a declared metric (``--rank-by``: ``kl`` to the dense model
by default, ``perplexity``, ``top1``, ``tasks`` or one task), paired over the same held-out windows or
examples, within groups of runs that removed the same amount (layer-equivalents within ``--tolerance``), the
seeds of one method pooled into one competitor; Holm-corrected. The Markdown says how it ranked and lists
every pair under the table. The dense model's row is the ``reference``.

Seeds: runs whose configs differ only in their seeds (``pruner.options.seed``, e.g. ``random_layers``'s draw or
a trained method's shuffling, and the run-level ``seed``) form one seed group (``seed_group``, the config
hash without the seeds). A group of two or more runs gets one more row, ``row_kind`` = ``seed mean``: the mean
of every numeric column over its runs, the sample standard deviation (ddof 1) of the quality columns
(``*_std``, ``std:<task>``), ``n_seeds`` and ``seeds``; its rank is the seed group's (one competitor). The CSV keeps
the per-seed rows (``row_kind`` = ``seed``) beside it; the Markdown and the plots show the mean row only.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import pandas as pd

from depthbench import atomic
from depthbench.errors import ConfigError
from depthbench.experiments.ranking import DEFAULT_RANK_BY, OFF_RATIO, RANK_BY, TOLERANCE, Ranking, rank_groups
from depthbench.experiments.records import (benchmark_key, lower_is_better_tasks, metric, module_columns, seed_group,
                                            short_task_name)
from depthbench.experiments.resume import RESULT_FILE, read_record
from depthbench.experiments.seed_rows import SEED_MEAN, SPREAD_COLUMNS, table_rows

ID_COLUMNS = ["model", "method", "ratio", "rank", "n_seeds", "layers_removed", "removed_layers", "removed_sub_blocks"]
#: Columns a mean over seeds does not average: identity, or the seeds themselves.
NOT_AVERAGED = ("model", "method", "ratio", "layers_removed", "seed", "pruner_seed", "n_seeds")
REFERENCE_RANK = "reference"


def load_records(directories: list[Path]) -> list[dict]:
    records: dict[str, dict] = {}
    for directory in directories:
        for path in sorted(Path(directory).rglob(RESULT_FILE)):
            record = read_record(path)
            if record is not None:
                record["_path"] = str(path.parent)
                records.setdefault(record["config_hash"], record)
    return list(records.values())


def base_row(record: dict) -> dict:
    """The unpruned model's row (its numbers are shared by every record of that model and benchmark)."""
    base = record.get("metrics", {}).get("base", {})
    row = {"model": record["model"]["name"], "method": "base (dense)", "ratio": 0.0, "layers_removed": 0,
           "row_kind": "base", "removed_layers": "", "params_removed_%": 0.0, "params_removed_no_emb_%": 0.0,
           "ppl_base": metric(base, "heldout_perplexity", "perplexity"),
           "ppl_pruned": metric(base, "heldout_perplexity", "perplexity")}
    for task, value in (base.get("tasks") or {}).items():
        row[f"task:{short_task_name(task)}"] = value
        row[f"stderr:{short_task_name(task)}"] = metric(base, "benchmark", "tasks", task, "stderr")
    if base.get("tasks"):
        row["average"] = sum(base["tasks"].values()) / len(base["tasks"])
        interval = metric(record, "metrics", "retention", "intervals", "base_average")
        row["average_lo"], row["average_hi"] = interval or (None, None)
        row["retention_%"] = 100.0
    row.update(lower_is_better_columns(base))
    row["speedup_prefill"] = row["speedup_decode"] = 1.0 if "speed" in record.get("metrics", {}) else None
    key = f"{record['model']['name']}|{benchmark_key(record)}|{row['ppl_base']}"
    row["config_hash"] = "base-" + hashlib.sha256(key.encode()).hexdigest()[:11]
    return row


def lower_is_better_columns(quality: dict) -> dict:
    """The tasks on a lower-is-better metric, never in the task average or the retention: the gold-solution bits
    per byte as ``bpb:<task>`` (``stderr:<task>``: its delta-method standard error) and ``reasoning_bpb``, their
    mean; another such metric as ``<metric>:<task>``."""
    row, bpb = {}, []
    for task, result in lower_is_better_tasks(quality).items():
        name = short_task_name(task)
        prefix = "bpb" if result.get("metric") == "bits_per_byte" else result.get("metric")
        row[f"{prefix}:{name}"] = result.get("value")
        row[f"stderr:{name}"] = result.get("stderr")
        if prefix == "bpb":
            bpb.append(result.get("value"))
    if bpb:
        row["reasoning_bpb"] = None if None in bpb else sum(bpb) / len(bpb)
    return row


def fidelity_columns(fidelity: dict | None) -> dict:
    """KL(dense || pruned) mean and p99, top-1 agreement, RMS change of p(correct), flips averaged over tasks."""
    if not fidelity:
        return {}
    row = {"kl": fidelity.get("kl_mean"), "kl_se": fidelity.get("kl_stderr"), "kl_p99": fidelity.get("kl_p99"),
           "kl_bound": fidelity.get("kl_error_bound"),
           "top1_agree_%": fidelity.get("top1_agreement_percent"),
           "rms_dp_correct": fidelity.get("rms_delta_p_correct")}
    flips = [f for f in (fidelity.get("flips") or {}).values() if f.get("examples")]
    if flips:
        row["right_to_wrong_%"] = sum(f["right_to_wrong_percent"] for f in flips) / len(flips)
        row["wrong_to_right_%"] = sum(f["wrong_to_right_percent"] for f in flips) / len(flips)
    return row


def healing_columns(record: dict) -> dict:
    """The healing after pruning (``none``: the pruned model as it is) with its budget, and the healed model's
    perplexity, KL to the dense model, top-1 agreement, task average and retention (``metrics.healed``)."""
    h, healed = record.get("healing") or {}, metric(record, "metrics", "healed") or {}
    return {"healing": h.get("method", "none"), "healing_steps": h.get("steps"), "healing_tokens": h.get("tokens"),
            "healing_seconds": h.get("seconds"), "ppl_healed": metric(healed, "heldout_perplexity", "perplexity"),
            "kl_healed": metric(healed, "fidelity", "kl_mean"),
            "top1_agree_healed_%": metric(healed, "fidelity", "top1_agreement_percent"),
            "average_healed": metric(healed, "average"),
            "retention_healed_%": metric(healed, "retention", "average_percent")}


def record_row(record: dict) -> dict:
    p, m = record["pruning"], record.get("metrics", {})
    row = {
        "model": record["model"]["name"],
        "method": record["method"],
        "ratio": record["ratio"],
        "layers_removed": len(p["removed_layers"]),
        "removed_layers": " ".join(map(str, p["removed_layers"])),
        **module_columns(p),
        "params_removed_%": round(100 * p["fraction_parameters_removed"], 2),
        "params_removed_no_emb_%": round(100 * p["fraction_parameters_removed_without_embeddings"], 2),
        "ppl_base": metric(m, "base", "heldout_perplexity", "perplexity"),
        "ppl_pruned": metric(m, "pruned", "heldout_perplexity", "perplexity"),
    }
    for task, value in (metric(m, "pruned", "tasks", default={}) or {}).items():
        row[f"task:{short_task_name(task)}"] = value
        row[f"stderr:{short_task_name(task)}"] = metric(m, "pruned", "benchmark", "tasks", task, "stderr")
    if metric(m, "pruned", "tasks"):
        tasks = list(metric(m, "pruned", "tasks").values())
        row["average"] = sum(tasks) / len(tasks)
    intervals = metric(m, "retention", "intervals") or {}
    row["average_lo"], row["average_hi"] = intervals.get("pruned_average") or (None, None)
    row["retention_%"] = metric(m, "retention", "average_percent")
    row["retention_lo"], row["retention_hi"] = intervals.get("retention_average_percent") or (None, None)
    row.update(lower_is_better_columns(m.get("pruned") or {}))
    row.update(fidelity_columns(m.get("fidelity")))
    row.update(healing_columns(record))
    for kind in ("prefill", "decode"):
        row[f"speedup_{kind}"] = metric(m, "speedup", kind)
        row[f"speedup_{kind}_lo"], row[f"speedup_{kind}_hi"] = metric(m, "speedup", f"{kind}_interval") or (None, None)
        row[f"speedup_{kind}_analytic"] = metric(m, "speedup", f"{kind}_analytic")
        row[f"speedup_{kind}_limit"] = metric(m, "speedup", f"{kind}_limit")
        row[f"speedup_{kind}_consistent"] = metric(m, "speedup", f"{kind}_consistent")
    row["prune_seconds"] = round(sum(s["seconds"] for k, s in record["stages"].items() if k.startswith("prune.")), 2)
    budget = p.get("budget") or {}  # absent in records written before issue 15
    for key in ("calibration_tokens", "training_tokens", "optimizer_steps"):
        row[key] = budget.get(key)
    row["seed"] = record.get("seed")
    row["pruner_seed"] = (p.get("options") or {}).get("seed")
    row["row_kind"] = "run"
    row["seed_group"] = seed_group(record)
    row["config_hash"] = record["config_hash"]
    row["run_dir"] = record.get("_path")
    return row


def _shared_rank(ranks: pd.Series) -> str | None:
    """The rank of a seed group: its runs are one competitor and share it (a run without the ranking metric has
    none)."""
    return next((r for r in ranks if isinstance(r, str)), None)


def _seed_list(values: pd.Series) -> str:
    return ",".join(str(int(v)) if float(v).is_integer() else str(v) for v in values)


def pooled_speedup_consistency(group: pd.DataFrame, mean_row: dict, kind: str) -> bool | None:
    """Whether a seed group's mean ``kind`` speed-up can be taken at face value: False where a seed's own
    measurement is inconsistent (its interval lies outside [1, limit], `depthbench.evaluation.efficiency`), or
    where the mean over the seeds lies outside [1, the largest seed's limit] (seeds measured under a noisy load
    can each have an interval wide enough to meet the limit while their mean is beyond what the pruned model
    can run at); None where no seed recorded the check."""
    flags = [bool(v) for v in group.get(f"speedup_{kind}_consistent", pd.Series(dtype=object)) if v is not None
             and not (isinstance(v, float) and math.isnan(v))]
    if not flags:
        return None
    limits = pd.to_numeric(group.get(f"speedup_{kind}_limit", pd.Series(dtype=float)), errors="coerce").dropna()
    mean = mean_row.get(f"speedup_{kind}")
    within = limits.empty or mean is None or math.isnan(mean) or 1.0 <= mean <= float(limits.max())
    return all(flags) and within


def seed_aggregates(frame: pd.DataFrame) -> pd.DataFrame:
    """One ``seed mean`` row per seed group of two or more runs (see the module docstring); marks those runs
    ``row_kind`` = ``seed``. Means propagate a missing value (a seed without a number makes the mean None)."""
    runs = frame[frame["row_kind"] == "run"]
    rows = []
    for group_key, group in runs.groupby("seed_group", sort=False):
        if len(group) < 2:
            continue
        frame.loc[group.index, "row_kind"] = "seed"
        first = group.iloc[0]
        row = {c: first[c] for c in ("model", "method", "ratio", "layers_removed", "seed_group")}
        for column in group.columns:  # what the seeds share (e.g. the healing method), not only the identity
            if column not in row and not pd.api.types.is_numeric_dtype(group[column]) and \
                    group[column].nunique(dropna=False) == 1:
                row[column] = first[column]
        numeric = [c for c in group.columns if pd.api.types.is_numeric_dtype(group[c])
                   and not pd.api.types.is_bool_dtype(group[c]) and c not in NOT_AVERAGED
                   and not c.startswith("stderr:") and not c.endswith(("_lo", "_hi"))]
        for column in numeric:
            row[column] = group[column].astype(float).mean(skipna=False)
        for column in [c for c in SPREAD_COLUMNS if c in numeric] + [c for c in numeric if c.startswith("task:")]:
            std = group[column].astype(float).std(ddof=1, skipna=False)
            row["std:" + column[5:] if column.startswith("task:") else f"{column}_std"] = std
        row["removed_layers"] = row["removed_sub_blocks"] = ""
        seeds = []
        if group["pruner_seed"].nunique(dropna=False) > 1:
            seeds.append(f"pruner.options.seed={_seed_list(group['pruner_seed'])}")
        if group["seed"].nunique(dropna=False) > 1:
            seeds.append(f"seed={_seed_list(group['seed'])}")
        for kind in ("prefill", "decode"):
            row[f"speedup_{kind}_consistent"] = pooled_speedup_consistency(group, row, kind)
        row.update({"n_seeds": len(group), "seeds": "; ".join(seeds), "rank": _shared_rank(group["rank"]),
                    "row_kind": SEED_MEAN, "config_hash": f"seeds-{group_key}", "run_dir": None})
        rows.append(row)
    return pd.DataFrame(rows)


def build_frame(records: list[dict], rank_by: str = DEFAULT_RANK_BY, tolerance: float = TOLERANCE) -> pd.DataFrame:
    """One row per distinct run config, plus one ``base (dense)`` row per model and benchmark; ranked by
    ``rank_by`` (`depthbench.experiments.ranking.rank_groups`). ``frame.attrs``: ``pairs`` and ``ranking``."""
    bases = {row["config_hash"]: row for row in (base_row(r) for r in records if r.get("metrics", {}).get("base"))}
    frame = pd.DataFrame([record_row(r) for r in records] + list(bases.values()))
    if frame.empty:
        return frame
    ranking = rank_groups(records, rank_by, tolerance)
    frame["rank"] = [REFERENCE_RANK if kind == "base" else ranking.ranks.get(h)
                     for h, kind in zip(frame["config_hash"], frame["row_kind"])]
    frame["compared_at"] = frame["config_hash"].map(ranking.compared_at)
    means = seed_aggregates(frame)
    if not means.empty:
        frame = pd.concat([frame, means], ignore_index=True)
    task_columns = sorted(c for c in frame.columns if c.startswith("task:"))
    order = ID_COLUMNS + [c for c in frame.columns if c not in ID_COLUMNS and not c.startswith("task:")]
    order = order[:len(ID_COLUMNS)] + task_columns + order[len(ID_COLUMNS):]
    frame = frame[[c for c in order if c in frame.columns]]
    frame["_mean_last"] = frame["row_kind"] == SEED_MEAN  # a seed group's mean row right after its runs
    frame = (frame.sort_values(["model", "ratio", "method", "seed_group", "_mean_last", "config_hash"])
             .drop(columns="_mean_last").reset_index(drop=True))
    frame.attrs["pairs"] = ranking.pairs
    frame.attrs["ranking"] = ranking
    return frame


def _interval_text(value, lo, hi, fmt: str) -> str:
    if value is None or pd.isna(value):
        return ""
    text = format(value, fmt)
    if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
        text += f" [{format(lo, fmt)}, {format(hi, fmt)}]"
    return text


def _spread_text(value, std, fmt: str) -> str:
    return "" if value is None or pd.isna(value) else format(value, fmt) + (
        "" if std is None or pd.isna(std) else f" ± {format(std, fmt)}")


def _text(value, fmt: str, std=None, se=None) -> str:
    """``value``, ``± std`` (over seeds) where given, else ``± se`` where given; empty for a missing value."""
    if value is None or pd.isna(value):
        return ""
    spread = std if std is not None and not pd.isna(std) else se
    return format(value, fmt) + ("" if spread is None or pd.isna(spread) else f" ± {format(spread, fmt)}")


def _removed_text(row) -> str:
    """What a row removed: layer-equivalents, the % of non-embedding parameters, and the sub-blocks if any."""
    if row.get("row_kind") == "base":
        return ""
    eq, pct = row.get("layer_equivalents"), row.get("params_removed_no_emb_%")
    text = f"{row['layers_removed']:.0f} layers" if eq is None or pd.isna(eq) else f"{eq:.2f} L-eq"
    if isinstance(row.get("removed_sub_blocks"), str) and row["removed_sub_blocks"]:
        text += f" ({row['attn_removed']:.0f} attn + {row['mlp_removed']:.0f} mlp)"
    return text + ("" if pct is None or pd.isna(pct) else f", {pct:.1f}%")


def _speedup_text(row, kind: str) -> str:
    col = f"speedup_{kind}"
    if row.get(col) is None or pd.isna(row.get(col)):
        return ""
    if row.get("row_kind") == SEED_MEAN:  # a mean over seeds: +- std, not one run's interval
        text = _text(row[col], ".2f", std=row.get(f"{col}_std"))
    else:
        text = _interval_text(row[col], row.get(f"{col}_lo"), row.get(f"{col}_hi"), ".2f")
    consistent = row.get(f"{col}_consistent")
    return text + (" (!)" if consistent is not None and not pd.isna(consistent) and not bool(consistent) else "")


def _rank_number(rank) -> float:
    if not isinstance(rank, str):
        return float("inf")
    if rank == REFERENCE_RANK:
        return -1.0
    return float(rank.rstrip("=" + OFF_RATIO))


def _in_rank_order(frame: pd.DataFrame) -> pd.DataFrame:
    if "rank" not in frame:
        return frame
    keys = pd.DataFrame({"model": frame["model"], "base": frame.get("row_kind", "") != "base",
                         "healing": frame["healing"].fillna("none") if "healing" in frame else "none",
                         "group": frame["compared_at"].astype(object).fillna("~") if "compared_at" in frame else "",
                         "rank": frame["rank"].map(_rank_number), "method": frame["method"]})
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The compact Markdown view (`leaderboard.md`; everything else is in leaderboard.csv): method, rank, what it
    removed, perplexity, KL to the dense model ± its standard error over windows and its top-k error bound, top-1
    agreement, task average with its 95% interval, decode speed-up with its interval (``(!)``: outside the limit
    `depthbench.evaluation.efficiency` states; for a seed mean `pooled_speedup_consistency`), prune time, optimizer
    steps where some method trained (its budget); model / ratio / healing columns only where they vary; a seed
    group as its mean row (``± std`` over seeds, ``seeds`` = how many). Rows in rank order within each model,
    healing and comparison group, the dense model first."""
    frame = _in_rank_order(table_rows(frame))
    rows = [row for _, row in frame.iterrows()]
    out = pd.DataFrame(index=frame.index)
    pruned = frame[frame["row_kind"] != "base"] if "row_kind" in frame else frame
    for col in ("model", "ratio"):
        if col in frame and pruned[col].nunique() > 1:
            out[col] = frame[col]
    out["method"] = frame["method"]
    out["rank"] = frame["rank"] if "rank" in frame else ""
    out["removed"] = [_removed_text(r) for r in rows]
    healed = "healing" in frame and frame["healing"].fillna("none").ne("none").any()
    if healed:
        out["healing"] = frame["healing"].fillna("none")
    out["ppl"] = [_text(r.get("ppl_pruned"), ".4g", std=r.get("ppl_pruned_std")) for r in rows]
    if "kl" in frame and frame["kl"].notna().any():
        out["KL ± SE (windows)"] = [_text(r.get("kl"), ".3f", std=r.get("kl_std"), se=r.get("kl_se")) for r in rows]
        if "kl_bound" in frame and frame["kl_bound"].notna().any():
            out["KL top-k bound"] = [_text(r.get("kl_bound"), ".1e") for r in rows]
        out["top-1 %"] = [_text(r.get("top1_agree_%"), ".1f", std=r.get("top1_agree_%_std")) for r in rows]
    if healed:
        out["ppl healed"] = [_text(r.get("ppl_healed"), ".4g", std=r.get("ppl_healed_std")) for r in rows]
        out["KL healed"] = [_text(r.get("kl_healed"), ".3f", std=r.get("kl_healed_std")) for r in rows]
    if "average" in frame and frame["average"].notna().any():
        out["tasks [95% CI]"] = [_text(r.get("average"), ".3f", std=r.get("average_std"))
                                 if r.get("row_kind") == SEED_MEAN else
                                 _interval_text(r.get("average"), r.get("average_lo"), r.get("average_hi"), ".3f")
                                 for r in rows]
    if "reasoning_bpb" in frame and frame["reasoning_bpb"].notna().any():  # lower is better; not in the tasks
        out["gold bpb (lower better)"] = [_text(r.get("reasoning_bpb"), ".3f", std=r.get("reasoning_bpb_std"))
                                          for r in rows]
    if "speedup_decode" in frame and frame["speedup_decode"].notna().any():
        out["decode speed-up [95% CI]"] = [_speedup_text(r, "decode") for r in rows]
    if "prune_seconds" in frame:
        out["prune s"] = [_text(r.get("prune_seconds"), ".0f") for r in rows]
    if "optimizer_steps" in frame and (frame["optimizer_steps"].fillna(0) > 0).any():  # a trained method's budget
        out["train steps"] = [_text(r.get("optimizer_steps"), ".0f") for r in rows]
    if "row_kind" in frame and (frame["row_kind"] == SEED_MEAN).any():
        out["seeds"] = ["" if pd.isna(n) else str(int(n)) for n in frame.get("n_seeds", [None] * len(frame))]
    return out.reset_index(drop=True)


def seeds_note(frame: pd.DataFrame) -> str:
    """The sentence under the table that says how rows with ``seeds`` were made (empty when there are none)."""
    if "row_kind" not in frame or not (frame["row_kind"] == SEED_MEAN).any():
        return ""
    return ("\nRows with `seeds`: mean ± sample standard deviation (ddof 1) over that many runs that differ only "
            "in their seeds (leaderboard.csv: `seeds`); they are one competitor, ranked on the mean over seeds of "
            "each window's (or example's) value. The per-seed rows, with their intervals, are in leaderboard.csv "
            "(`row_kind` = seed).\n")


def speedup_note(shown: pd.DataFrame) -> str:
    """The sentence under the table that says what ``(!)`` after a speed-up means (empty when no row has it)."""
    column = "decode speed-up [95% CI]"
    if column not in shown or not shown[column].str.endswith("(!)").any():
        return ""
    return ("\n(!) after a speed-up: the measurement is inconsistent with what the pruned model can run at: its 95% "
            "interval lies outside [1, limit], limit = max(FLOPs ratio, ratio of sub-blocks that run) "
            "(leaderboard.csv: `speedup_decode_limit`); for a seed mean, a seed's interval does, or the mean over the "
            "seeds lies outside [1, limit]. Usually a machine whose load changed while it measured: measure again on "
            "a quiet one.\n")


def ranking_note(frame: pd.DataFrame) -> str:
    """How the table was ranked (the sentence above it)."""
    ranking = frame.attrs.get("ranking")
    if not isinstance(ranking, Ranking):
        return ""
    return ranking.description + " KL ± SE: the standard error over held-out windows; KL top-k bound: the most the " \
        "dense reference's top-k storage could hide (a worst case: the exact KL lies in [KL, KL + bound]).\n\n"


def pairwise_markdown(pairs: list[dict]) -> str:
    """The pairwise significance table: difference of the ranking metric (a - b, a the better estimate), raw and
    Holm-corrected p."""
    if not pairs:
        return ""
    table = pd.DataFrame([{"model": p["model"], "compared at": p["compared_at"], "a": p["a"], "b": p["b"],
                           f"{p['metric']}(a) - {p['metric']}(b)": p["difference"], "p": p["p_value"],
                           "p (Holm)": p["p_holm"], "significant": "yes" if p["significant"] else "no"}
                          for p in pairs])
    if any(p.get("healing", "none") != "none" for p in pairs):
        table.insert(2, "healing", [p.get("healing", "none") for p in pairs])
    return ("\n## Pairwise comparisons\n\nPaired sign-flip randomisation test "
            f"({pairs[0]['iterations']} draws) on the ranking metric, Holm-corrected within each group (healed runs "
            "compared on their healed numbers). perplexity is compared as NLL per token (its log).\n\n"
            + table.to_markdown(index=False, floatfmt=".4g") + "\n")


def write_leaderboard(frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "leaderboard.csv", "md": out_dir / "leaderboard.md"}
    atomic.write_text(paths["csv"], frame.to_csv(index=False))
    shown = display_frame(frame)
    atomic.write_text(paths["md"], ranking_note(frame) + shown.to_markdown(index=False) + "\n" + seeds_note(frame)
                      + speedup_note(shown) + pairwise_markdown(frame.attrs.get("pairs", [])))
    from depthbench.experiments.plots import write_plots

    paths.update(write_plots(frame, out_dir / "plots"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="depthbench-leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--wandb", choices=["offline", "online"], default=None,
                        help="also log the table to Weights & Biases (offline writes files only)")
    parser.add_argument("--rank-by", default=DEFAULT_RANK_BY,
                        help=f"the metric that ranks: {', '.join(RANK_BY)} or one task's name (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="layer-equivalents removed within which runs compare as equals (default: %(default)s)")
    parser.add_argument("--group", default=None, help="W&B group (default: the first directory's name)")
    parser.add_argument("--columns", default=None,
                        help="also print a Markdown table of these comma-separated columns (of leaderboard.csv), "
                             "e.g. method,healing,healing_steps,ppl_pruned,ppl_healed,kl,kl_healed")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.directories if not d.is_dir()]
    if missing:
        print(f"depthbench-leaderboard: error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    records = load_records(args.directories)
    if not records:
        print(f"depthbench-leaderboard: error: no {RESULT_FILE} under {', '.join(map(str, args.directories))}",
              file=sys.stderr)
        return 2
    try:
        frame = build_frame(records, args.rank_by, args.tolerance)
    except ConfigError as err:  # before anything is written
        print(f"depthbench-leaderboard: error: {err}", file=sys.stderr)
        return 2
    wanted = [c.strip() for c in (args.columns or "").split(",") if c.strip()]
    unknown = [c for c in wanted if c not in frame.columns]
    if unknown:  # before anything is written
        print(f"depthbench-leaderboard: error: unknown column(s) {', '.join(unknown)}; allowed: the columns of "
              f"leaderboard.csv: {', '.join(frame.columns)}", file=sys.stderr)
        return 2
    paths = write_leaderboard(frame, args.directories[0])
    if args.wandb:
        from depthbench.experiments.tracking import WandbTracker

        WandbTracker(mode=args.wandb).log_table(frame, args.directories[0],
                                                group=args.group or args.directories[0].name)
    print(display_frame(frame).to_string(index=False))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if wanted:
        print(table_rows(frame)[wanted].to_markdown(index=False, floatfmt=".4g"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

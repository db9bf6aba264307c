"""Aggregate result records into a leaderboard (CSV + Markdown) and plots.

``depthbench-leaderboard DIR [DIR ...]`` loads every ``result.json`` under the given run or sweep
directories into a pandas DataFrame, one row per distinct run config (model x method x ratio x
whatever else differs), and writes into the first DIR: ``leaderboard.csv``, ``leaderboard.md`` and
``plots/*.png``. Rows are keyed by config hash, so aggregating twice, or a resumed sweep, never
duplicates a row.

Ranking: within each group of rows with the same model, ratio and benchmark tasks, every pair of
methods is compared on the average-task accuracy with a paired randomisation test over the examples
(`depthbench.evaluation.stats`), p-values Holm-corrected within the group; a method's ``rank`` is 1 +
the number of methods significantly better (adjusted p < 0.05), ``=`` marks a shared rank. The
Markdown lists every pair under the table. Rows without per-example results get no rank.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import pandas as pd

from depthbench import atomic
from depthbench.experiments.resume import RESULT_FILE, read_record

ID_COLUMNS = ["model", "method", "ratio", "rank", "layers_removed", "removed_layers"]
ALPHA = 0.05


def load_records(directories: list[Path]) -> list[dict]:
    records: dict[str, dict] = {}
    for directory in directories:
        for path in sorted(Path(directory).rglob(RESULT_FILE)):
            record = read_record(path)
            if record is not None:
                record["_path"] = str(path.parent)
                records.setdefault(record["config_hash"], record)
    return list(records.values())


def _metric(metrics: dict, *keys, default=None):
    for key in keys:
        if not isinstance(metrics, dict) or key not in metrics:
            return default
        metrics = metrics[key]
    return metrics


def short_task_name(task: str) -> str:
    """``bigbench_date_understanding_multiple_choice`` -> ``date_understanding`` (others unchanged)."""
    return task.removeprefix("bigbench_").removesuffix("_multiple_choice")


def base_row(record: dict) -> dict:
    """The unpruned model's row (its numbers are shared by every record of that model and benchmark)."""
    base = record.get("metrics", {}).get("base", {})
    row = {"model": record["model"]["name"], "method": "base (dense)", "ratio": 0.0, "layers_removed": 0,
           "removed_layers": "", "params_removed_%": 0.0, "params_removed_no_emb_%": 0.0,
           "ppl_base": _metric(base, "heldout_perplexity", "perplexity"),
           "ppl_pruned": _metric(base, "heldout_perplexity", "perplexity")}
    for task, value in (base.get("tasks") or {}).items():
        row[f"task:{short_task_name(task)}"] = value
        row[f"stderr:{short_task_name(task)}"] = _metric(base, "benchmark", "tasks", task, "stderr")
    if base.get("tasks"):
        row["average"] = sum(base["tasks"].values()) / len(base["tasks"])
        interval = _metric(record, "metrics", "retention", "intervals", "base_average")
        row["average_lo"], row["average_hi"] = interval or (None, None)
        row["retention_%"] = 100.0
    row["speedup_prefill"] = row["speedup_decode"] = 1.0 if "speed" in record.get("metrics", {}) else None
    key = f"{record['model']['name']}|{_benchmark_key(record)}|{row['ppl_base']}"
    row["config_hash"] = "base-" + hashlib.sha256(key.encode()).hexdigest()[:11]
    return row


def fidelity_columns(fidelity: dict | None) -> dict:
    """KL(dense || pruned) mean and p99, top-1 agreement, RMS change of p(correct), flips averaged over tasks."""
    if not fidelity:
        return {}
    row = {"kl": fidelity.get("kl_mean"), "kl_se": fidelity.get("kl_stderr"), "kl_p99": fidelity.get("kl_p99"),
           "top1_agree_%": fidelity.get("top1_agreement_percent"),
           "rms_dp_correct": fidelity.get("rms_delta_p_correct")}
    flips = [f for f in (fidelity.get("flips") or {}).values() if f.get("examples")]
    if flips:
        row["right_to_wrong_%"] = sum(f["right_to_wrong_percent"] for f in flips) / len(flips)
        row["wrong_to_right_%"] = sum(f["wrong_to_right_percent"] for f in flips) / len(flips)
    return row


def _benchmark_key(record: dict) -> str:
    tasks = sorted((record.get("metrics", {}).get("base", {}).get("tasks") or {}))
    return ",".join(short_task_name(t) for t in tasks) or "perplexity"


def record_row(record: dict) -> dict:
    p, m = record["pruning"], record.get("metrics", {})
    row = {
        "model": record["model"]["name"],
        "method": record["method"],
        "ratio": record["ratio"],
        "layers_removed": len(p["removed_layers"]),
        "removed_layers": " ".join(map(str, p["removed_layers"])),
        "params_removed_%": round(100 * p["fraction_parameters_removed"], 2),
        "params_removed_no_emb_%": round(100 * p["fraction_parameters_removed_without_embeddings"], 2),
        "ppl_base": _metric(m, "base", "heldout_perplexity", "perplexity"),
        "ppl_pruned": _metric(m, "pruned", "heldout_perplexity", "perplexity"),
    }
    for task, value in (_metric(m, "pruned", "tasks", default={}) or {}).items():
        row[f"task:{short_task_name(task)}"] = value
        row[f"stderr:{short_task_name(task)}"] = _metric(m, "pruned", "benchmark", "tasks", task, "stderr")
    if _metric(m, "pruned", "tasks"):
        tasks = list(_metric(m, "pruned", "tasks").values())
        row["average"] = sum(tasks) / len(tasks)
    intervals = _metric(m, "retention", "intervals") or {}
    row["average_lo"], row["average_hi"] = intervals.get("pruned_average") or (None, None)
    row["retention_%"] = _metric(m, "retention", "average_percent")
    row["retention_lo"], row["retention_hi"] = intervals.get("retention_average_percent") or (None, None)
    row.update(fidelity_columns(m.get("fidelity")))
    for kind in ("prefill", "decode"):
        row[f"speedup_{kind}"] = _metric(m, "speedup", kind)
        row[f"speedup_{kind}_lo"], row[f"speedup_{kind}_hi"] = _metric(m, "speedup", f"{kind}_interval") or (None, None)
        row[f"speedup_{kind}_analytic"] = _metric(m, "speedup", f"{kind}_analytic")
        row[f"speedup_{kind}_consistent"] = _metric(m, "speedup", f"{kind}_consistent")
    row["prune_seconds"] = round(sum(s["seconds"] for k, s in record["stages"].items() if k.startswith("prune.")), 2)
    budget = p.get("budget") or {}  # absent in records written before issue 15
    for key in ("calibration_tokens", "training_tokens", "optimizer_steps"):
        row[key] = budget.get(key)
    row["seed"] = record.get("seed")
    row["config_hash"] = record["config_hash"]
    row["run_dir"] = record.get("_path")
    return row


def _per_example(record: dict) -> dict | None:
    """task -> per-example results of the pruned model, or None if a task has none."""
    tasks = _metric(record, "metrics", "pruned", "benchmark", "tasks") or {}
    if not tasks or not all(t.get("samples") for t in tasks.values()):
        return None
    return {task: t["samples"] for task, t in tasks.items()}


def rank_groups(records: list[dict]) -> tuple[dict[str, str], list[dict]]:
    """Ranks (config hash -> "1", "2=", ...) and pairwise tests within each (model, ratio, benchmark) group."""
    from depthbench.evaluation.stats import rank_methods

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if _per_example(r) is not None and _metric(r, "metrics", "pruned", "tasks"):
            groups.setdefault((r["model"]["name"], r["ratio"], _benchmark_key(r)), []).append(r)
    ranks: dict[str, str] = {}
    pairs: list[dict] = []
    for (model, ratio, bench), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(members) < 2:
            continue
        methods = [r["method"] for r in members]
        labels = {r["config_hash"]: r["method"] if methods.count(r["method"]) == 1
                  else f"{r['method']}#{r['config_hash'][:6]}" for r in members}
        scores = {labels[r["config_hash"]]: r["metrics"]["pruned"]["average"] for r in members}
        samples = {labels[r["config_hash"]]: _per_example(r) for r in members}
        group_ranks, group_pairs = rank_methods(scores, samples, alpha=ALPHA)
        for r in members:
            ranks[r["config_hash"]] = group_ranks[labels[r["config_hash"]]]
        pairs += [{"model": model, "ratio": ratio, "benchmark": bench, **p} for p in group_pairs]
    return ranks, pairs


def build_frame(records: list[dict]) -> pd.DataFrame:
    """One row per distinct run config, plus one ``base (dense)`` row per model and benchmark."""
    bases = {row["config_hash"]: row for row in (base_row(r) for r in records if r.get("metrics", {}).get("base"))}
    frame = pd.DataFrame([record_row(r) for r in records] + list(bases.values()))
    if frame.empty:
        return frame
    ranks, pairs = rank_groups(records)
    frame["rank"] = frame["config_hash"].map(ranks)
    frame.attrs["pairs"] = pairs
    task_columns = sorted(c for c in frame.columns if c.startswith("task:"))
    order = ID_COLUMNS + [c for c in frame.columns if c not in ID_COLUMNS and not c.startswith("task:")]
    order = order[:len(ID_COLUMNS)] + task_columns + order[len(ID_COLUMNS):]
    frame = frame[[c for c in order if c in frame.columns]]
    frame = frame.sort_values(["model", "ratio", "method", "config_hash"]).reset_index(drop=True)
    frame.attrs["pairs"] = pairs
    return frame


def _interval_text(value, lo, hi, fmt: str) -> str:
    if value is None or pd.isna(value):
        return ""
    text = format(value, fmt)
    if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
        text += f" [{format(lo, fmt)}, {format(hi, fmt)}]"
    return text


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The Markdown view: task scores as ``value ± stderr``, average / retention / speed-up with their 95%
    intervals in brackets, a speed-up outside [1, analytic] marked ``(!)``; CSV-only columns dropped."""
    out = frame.copy()
    for col in [c for c in frame.columns if c.startswith("task:")]:
        se_col = "stderr:" + col[5:]
        out[col] = [("" if pd.isna(v) else f"{v:.3f}") + (f" ± {se:.3f}" if se_col in frame and not pd.isna(se) else "")
                    for v, se in zip(frame[col], frame[se_col] if se_col in frame else [None] * len(frame))]
    for col, lo, hi, fmt in (("average", "average_lo", "average_hi", ".3f"),
                             ("retention_%", "retention_lo", "retention_hi", ".1f")):
        if col in frame:
            out[col] = [_interval_text(v, a, b, fmt) for v, a, b in
                        zip(frame[col], frame.get(lo, [None] * len(frame)), frame.get(hi, [None] * len(frame)))]
    for kind in ("prefill", "decode"):
        col = f"speedup_{kind}"
        if col in frame:
            texts = []
            for i, v in enumerate(frame[col]):
                lo, hi = (frame[f"{col}_{e}"].iloc[i] if f"{col}_{e}" in frame else None for e in ("lo", "hi"))
                t = _interval_text(v, lo, hi, ".2f")
                consistent = frame[f"{col}_consistent"].iloc[i] if f"{col}_consistent" in frame else None
                if consistent is False or (isinstance(consistent, float) and consistent == 0.0):
                    t += " (!)"
                texts.append(t)
            out[col] = texts
    drop = [c for c in frame.columns if c.startswith("stderr:") or c.endswith(("_lo", "_hi", "_consistent"))]
    return out.drop(columns=drop + ["run_dir"], errors="ignore")


def pairwise_markdown(pairs: list[dict]) -> str:
    """The pairwise significance table: difference of average-task accuracy (a - b), raw and Holm p."""
    if not pairs:
        return ""
    table = pd.DataFrame([{"model": p["model"], "ratio": p["ratio"], "a": p["a"], "b": p["b"],
                           "a - b": p["difference"], "p": p["p_value"], "p (Holm)": p["p_holm"],
                           "significant": "yes" if p["significant"] else "no"} for p in pairs])
    return ("\n## Pairwise comparisons\n\nPaired randomisation test over examples on the average-task accuracy "
            f"(sign flips, {pairs[0]['iterations']} draws), Holm-corrected within each model x ratio x benchmark "
            f"group; significant at {ALPHA}. rank = 1 + methods significantly better.\n\n"
            + table.to_markdown(index=False, floatfmt=".4g") + "\n")


def write_leaderboard(frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "leaderboard.csv", "md": out_dir / "leaderboard.md"}
    atomic.write_text(paths["csv"], frame.to_csv(index=False))
    shown = display_frame(frame)
    atomic.write_text(paths["md"], shown.to_markdown(index=False, floatfmt=".4g") + "\n"
                      + pairwise_markdown(frame.attrs.get("pairs", [])))
    from depthbench.experiments.plots import write_plots

    paths.update(write_plots(frame, out_dir / "plots"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="depthbench-leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--wandb", choices=["offline", "online"], default=None,
                        help="also log the table to Weights & Biases (offline writes files only)")
    parser.add_argument("--group", default=None, help="W&B group (default: the first directory's name)")
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
    frame = build_frame(records)
    paths = write_leaderboard(frame, args.directories[0])
    if args.wandb:
        from depthbench.experiments.tracking import WandbTracker

        WandbTracker(mode=args.wandb).log_table(frame, args.directories[0],
                                                group=args.group or args.directories[0].name)
    shown = display_frame(frame).drop(columns=["removed_layers", "config_hash", "seed"], errors="ignore")
    print(shown.round(3).to_string(index=False))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

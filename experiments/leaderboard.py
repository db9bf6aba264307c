"""Aggregate result records into a leaderboard (CSV + Markdown) and plots.

``depthbench-leaderboard DIR [DIR ...]`` loads every ``result.json`` under the given run or sweep
directories into a pandas DataFrame, one row per distinct run config (model x method x ratio x
whatever else differs), and writes into the first DIR: ``leaderboard.csv``, ``leaderboard.md`` and
``plots/*.png``. Rows are keyed by config hash, so aggregating twice, or a resumed sweep, never
duplicates a row.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import pandas as pd

from depthbench import atomic
from depthbench.experiments.resume import RESULT_FILE, read_record

ID_COLUMNS = ["model", "method", "ratio", "layers_removed", "removed_layers"]


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
    if base.get("tasks"):
        row["average"] = sum(base["tasks"].values()) / len(base["tasks"])
        row["retention_%"] = 100.0
    row["speedup_prefill"] = row["speedup_decode"] = 1.0 if "speed" in record.get("metrics", {}) else None
    key = f"{record['model']['name']}|{_benchmark_key(record)}|{row['ppl_base']}"
    row["config_hash"] = "base-" + hashlib.sha256(key.encode()).hexdigest()[:11]
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
    if _metric(m, "pruned", "tasks"):
        tasks = list(_metric(m, "pruned", "tasks").values())
        row["average"] = sum(tasks) / len(tasks)
    row["retention_%"] = _metric(m, "retention", "average_percent")
    row["speedup_prefill"] = _metric(m, "speedup", "prefill")
    row["speedup_decode"] = _metric(m, "speedup", "decode")
    row["prune_seconds"] = round(sum(s["seconds"] for k, s in record["stages"].items() if k.startswith("prune.")), 2)
    row["seed"] = record.get("seed")
    row["config_hash"] = record["config_hash"]
    row["run_dir"] = record.get("_path")
    return row


def build_frame(records: list[dict]) -> pd.DataFrame:
    """One row per distinct run config, plus one ``base (dense)`` row per model and benchmark."""
    bases = {row["config_hash"]: row for row in (base_row(r) for r in records if r.get("metrics", {}).get("base"))}
    frame = pd.DataFrame([record_row(r) for r in records] + list(bases.values()))
    if frame.empty:
        return frame
    task_columns = sorted(c for c in frame.columns if c.startswith("task:"))
    order = ID_COLUMNS + [c for c in frame.columns if c not in ID_COLUMNS and not c.startswith("task:")]
    order = order[:5] + task_columns + order[5:]
    frame = frame[[c for c in order if c in frame.columns]]
    return frame.sort_values(["model", "method", "ratio", "config_hash"]).reset_index(drop=True)


def write_leaderboard(frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "leaderboard.csv", "md": out_dir / "leaderboard.md"}
    atomic.write_text(paths["csv"], frame.to_csv(index=False))
    shown = frame.drop(columns=["run_dir"], errors="ignore")
    atomic.write_text(paths["md"], shown.to_markdown(index=False, floatfmt=".4g") + "\n")
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

        WandbTracker(mode=args.wandb).log_table(frame, args.directories[0], group=args.group or args.directories[0].name)
    shown = frame.drop(columns=["run_dir", "removed_layers", "config_hash", "seed"], errors="ignore")
    print(shown.round(3).to_string(index=False))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

Seeds: runs whose configs differ only in their seeds (``pruner.options.seed``, e.g. ``random_layers``'s draw or
a trained method's shuffling, and the run-level ``seed``) form one seed group (``seed_group``, the config
hash without the seeds). A group of two or more runs gets one more row, ``row_kind`` = ``seed mean``: the mean
of every numeric column over its runs, the sample standard deviation (ddof 1) of the quality columns
(``*_std``, ``std:<task>``), ``n_seeds`` and ``seeds``; its rank is the range of its runs' ranks. The CSV keeps
the per-seed rows (``row_kind`` = ``seed``) beside it; the Markdown and the plots show the mean row only.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import pandas as pd

from depthbench import atomic
from depthbench.experiments.resume import RESULT_FILE, config_hash, read_record

ID_COLUMNS = ["model", "method", "ratio", "rank", "n_seeds", "layers_removed", "removed_layers", "removed_sub_blocks"]
ALPHA = 0.05
#: Columns whose spread over seeds is reported (``<column>_std``; task scores as ``std:<task>``).
SPREAD_COLUMNS = ("average", "retention_%", "ppl_pruned", "kl", "top1_agree_%", "rms_dp_correct", "speedup_prefill",
                  "speedup_decode", "ppl_healed", "kl_healed", "average_healed", "retention_healed_%")
#: Columns a mean over seeds does not average: identity, or the seeds themselves.
NOT_AVERAGED = ("model", "method", "ratio", "layers_removed", "seed", "pruner_seed", "n_seeds")
SEED_MEAN = "seed mean"


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
           "row_kind": "base", "removed_layers": "", "params_removed_%": 0.0, "params_removed_no_emb_%": 0.0,
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


def healing_columns(record: dict) -> dict:
    """The healing after pruning (``none``: the pruned model as it is) with its budget, and the healed model's
    perplexity, KL to the dense model, top-1 agreement, task average and retention (``metrics.healed``)."""
    h, healed = record.get("healing") or {}, _metric(record, "metrics", "healed") or {}
    return {"healing": h.get("method", "none"), "healing_steps": h.get("steps"), "healing_tokens": h.get("tokens"),
            "healing_seconds": h.get("seconds"), "ppl_healed": _metric(healed, "heldout_perplexity", "perplexity"),
            "kl_healed": _metric(healed, "fidelity", "kl_mean"),
            "top1_agree_healed_%": _metric(healed, "fidelity", "top1_agreement_percent"),
            "average_healed": _metric(healed, "average"),
            "retention_healed_%": _metric(healed, "retention", "average_percent")}


def _benchmark_key(record: dict) -> str:
    tasks = sorted((record.get("metrics", {}).get("base", {}).get("tasks") or {}))
    return ",".join(short_task_name(t) for t in tasks) or "perplexity"


def module_columns(pruning: dict) -> dict:
    """Removed sub-blocks (``"K.attn"`` / ``"K.mlp"``), attention and MLP modules removed (a whole layer counts
    in both), layer-equivalents (removed decoder parameters / parameters of one layer) and the % of the KV cache
    removed. Records written before sub-blocks existed removed whole layers only: their counts are derived from
    ``removed_layers`` and the parameter counts (None where those are missing too)."""
    layers = len(pruning["removed_layers"])
    before = pruning.get("num_layers_before")
    params_before, params_after = pruning.get("parameters_before") or {}, pruning.get("parameters_after") or {}
    equivalents = pruning.get("layer_equivalents_removed")
    if equivalents is None and params_before.get("per_layer") and "without_embeddings" in params_after:
        equivalents = (params_before["without_embeddings"] - params_after["without_embeddings"]) / params_before[
            "per_layer"]
    kv = pruning.get("kv_cache_fraction_removed")
    if kv is None and "removed_attention_modules" not in pruning and before:
        kv = layers / before
    return {"removed_sub_blocks": " ".join(pruning.get("removed_sub_blocks") or []),
            "attn_removed": pruning.get("removed_attention_modules", layers),
            "mlp_removed": pruning.get("removed_mlp_modules", layers),
            "layer_equivalents": None if equivalents is None else round(equivalents, 3),
            "kv_removed_%": None if kv is None else round(100 * kv, 2)}


def seed_group(record: dict) -> str:
    """The config hash without the seeds (``seed``, ``pruner.options.seed``): runs that share it differ only
    in their seeds. A record without its config is a group of its own."""
    config = record.get("config")
    if not isinstance(config, dict):
        return record["config_hash"]
    config = {**config, "seed": None}
    if isinstance(config.get("healing"), dict):  # the healing seed follows the run seed by default
        config["healing"] = {k: v for k, v in config["healing"].items() if k != "seed"}
    pruner = config.get("pruner")
    if isinstance(pruner, dict) and isinstance(pruner.get("options"), dict):
        config["pruner"] = {**pruner, "options": {k: v for k, v in pruner["options"].items() if k != "seed"}}
    return config_hash(config)


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
    row.update(healing_columns(record))
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
    row["pruner_seed"] = (p.get("options") or {}).get("seed")
    row["row_kind"] = "run"
    row["seed_group"] = seed_group(record)
    row["config_hash"] = record["config_hash"]
    row["run_dir"] = record.get("_path")
    return row


def _healing_key(record: dict) -> str:
    """What healing a run had: ``none``, or the method and its budget (runs are ranked among equals)."""
    h = record.get("healing") or {}
    method = h.get("method", "none")
    return method if method == "none" else f"{method}:{h.get('steps')}:{h.get('tokens')}"


def _final_metrics(record: dict) -> dict:
    """The metrics of the model a run ends with: the healed model's where it was healed, else the pruned one's."""
    metrics = record.get("metrics") or {}
    if _healing_key(record) != "none" and metrics.get("healed"):
        return metrics["healed"]
    return metrics.get("pruned") or {}


def _per_example(record: dict) -> dict | None:
    """task -> per-example results of the model the run ends with (healed if healed), or None if a task has none."""
    tasks = _metric(_final_metrics(record), "benchmark", "tasks") or {}
    if not tasks or not all(t.get("samples") for t in tasks.values()):
        return None
    return {task: t["samples"] for task, t in tasks.items()}


def rank_groups(records: list[dict]) -> tuple[dict[str, str], list[dict]]:
    """Ranks (config hash -> "1", "2=", ...) and pairwise tests within each (model, ratio, benchmark, healing)
    group, on the numbers of the model each run ends with (healed runs on their healed scores)."""
    from depthbench.evaluation.stats import rank_methods

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if _per_example(r) is not None and _metric(_final_metrics(r), "tasks"):
            groups.setdefault((r["model"]["name"], r["ratio"], _benchmark_key(r), _healing_key(r)), []).append(r)
    ranks: dict[str, str] = {}
    pairs: list[dict] = []
    for (model, ratio, bench, healing), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(members) < 2:
            continue
        labels = _rank_labels(members)
        scores = {labels[r["config_hash"]]: _final_metrics(r)["average"] for r in members}
        samples = {labels[r["config_hash"]]: _per_example(r) for r in members}
        group_ranks, group_pairs = rank_methods(scores, samples, alpha=ALPHA)
        for r in members:
            ranks[r["config_hash"]] = group_ranks[labels[r["config_hash"]]]
        pairs += [{"model": model, "ratio": ratio, "benchmark": bench, "healing": healing, **p} for p in group_pairs]
    return ranks, pairs


def _rank_labels(members: list[dict]) -> dict[str, str]:
    """config hash -> the name a row has in the pairwise table: the method; ``method[seed=S]`` for runs of
    one method that differ in the pruner's seed, ``method[run seed=S]`` in the run-level seed; ``method#<hash>``
    where that is still ambiguous."""
    def names(r):
        seed = (r["pruning"].get("options") or {}).get("seed")
        return (r["method"], f"{r['method']}[seed={seed}]" if seed is not None else r["method"],
                f"{r['method']}[run seed={r.get('seed')}]")

    labels = {}
    for r in members:
        for label in names(r):
            if sum(1 for other in members if label in names(other)) == 1:
                labels[r["config_hash"]] = label
                break
        else:
            labels[r["config_hash"]] = f"{r['method']}#{r['config_hash'][:6]}"
    return labels


def _rank_span(ranks: pd.Series) -> str | None:
    """The ranks of a seed group's runs as one text: ``2=`` when they agree, ``2..4`` otherwise."""
    ranks = [r for r in ranks if isinstance(r, str)]
    if not ranks:
        return None
    if len(set(ranks)) == 1:
        return ranks[0]
    values = [int(r.rstrip("=")) for r in ranks]
    return f"{min(values)}..{max(values)}"


def _seed_list(values: pd.Series) -> str:
    return ",".join(str(int(v)) if float(v).is_integer() else str(v) for v in values)


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
        row.update({"n_seeds": len(group), "seeds": "; ".join(seeds), "rank": _rank_span(group["rank"]),
                    "row_kind": SEED_MEAN, "config_hash": f"seeds-{group_key}", "run_dir": None})
        rows.append(row)
    return pd.DataFrame(rows)


def build_frame(records: list[dict]) -> pd.DataFrame:
    """One row per distinct run config, plus one ``base (dense)`` row per model and benchmark."""
    bases = {row["config_hash"]: row for row in (base_row(r) for r in records if r.get("metrics", {}).get("base"))}
    frame = pd.DataFrame([record_row(r) for r in records] + list(bases.values()))
    if frame.empty:
        return frame
    ranks, pairs = rank_groups(records)
    frame["rank"] = frame["config_hash"].map(ranks)
    means = seed_aggregates(frame)
    if not means.empty:
        frame = pd.concat([frame, means], ignore_index=True)
    frame.attrs["pairs"] = pairs
    task_columns = sorted(c for c in frame.columns if c.startswith("task:"))
    order = ID_COLUMNS + [c for c in frame.columns if c not in ID_COLUMNS and not c.startswith("task:")]
    order = order[:len(ID_COLUMNS)] + task_columns + order[len(ID_COLUMNS):]
    frame = frame[[c for c in order if c in frame.columns]]
    frame["_mean_last"] = frame["row_kind"] == SEED_MEAN  # a seed group's mean row right after its runs
    frame = (frame.sort_values(["model", "ratio", "method", "seed_group", "_mean_last", "config_hash"])
             .drop(columns="_mean_last").reset_index(drop=True))
    frame.attrs["pairs"] = pairs
    return frame


def _interval_text(value, lo, hi, fmt: str) -> str:
    if value is None or pd.isna(value):
        return ""
    text = format(value, fmt)
    if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
        text += f" [{format(lo, fmt)}, {format(hi, fmt)}]"
    return text


def table_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows a table or plot shows: every row but the per-seed runs of a seed group (their mean stands for them)."""
    if "row_kind" not in frame:
        return frame
    return frame[frame["row_kind"] != "seed"].reset_index(drop=True)


def _spread_text(value, std, fmt: str) -> str:
    return "" if value is None or pd.isna(value) else format(value, fmt) + (
        "" if std is None or pd.isna(std) else f" ± {format(std, fmt)}")


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The Markdown view: task scores as ``value ± stderr``, average / retention / speed-up with their 95%
    intervals in brackets, a speed-up outside [1, analytic] marked ``(!)``; a seed group as its mean row with
    ``mean ± std`` over seeds (per-seed rows dropped); sub-block columns only when some row removed a sub-block;
    CSV-only columns dropped; the healing columns only when some run was healed."""
    frame = table_rows(frame)
    out = frame.copy()
    means = (frame["row_kind"] == SEED_MEAN) if "row_kind" in frame else pd.Series(False, index=frame.index)
    for col in [c for c in frame.columns if c.startswith("task:")]:
        se_col = "stderr:" + col[5:]
        out[col] = [("" if pd.isna(v) else f"{v:.3f}") + (f" ± {se:.3f}" if se_col in frame and not pd.isna(se) else "")
                    for v, se in zip(frame[col], frame[se_col] if se_col in frame else [None] * len(frame))]
    for col, lo, hi, fmt in (("average", "average_lo", "average_hi", ".3f"),
                             ("retention_%", "retention_lo", "retention_hi", ".1f")):
        if col in frame:
            out[col] = [_interval_text(v, a, b, fmt) for v, a, b in
                        zip(frame[col], frame.get(lo, [None] * len(frame)), frame.get(hi, [None] * len(frame)))]
    spread = [(c, "std:" + c[5:], ".3f") for c in frame.columns if c.startswith("task:")] + [
        (c, f"{c}_std", fmt) for c, fmt in (("average", ".3f"), ("retention_%", ".1f"), ("ppl_pruned", ".4g"),
                                            ("kl", ".3f")) if c in frame]
    for col, std_col, fmt in spread:
        if std_col in frame:
            if not col.startswith("task:") and col not in ("average", "retention_%"):  # numbers so far: as text
                out[col] = [_spread_text(v, None, fmt) for v in frame[col]]
            out.loc[means, col] = [_spread_text(v, sd, fmt) for v, sd in zip(frame.loc[means, col],
                                                                             frame.loc[means, std_col])]
    if "n_seeds" in frame:
        out["n_seeds"] = ["" if pd.isna(n) else str(int(n)) for n in frame["n_seeds"]]
    for kind in ("prefill", "decode"):
        col = f"speedup_{kind}"
        if col in frame:
            texts = []
            for i, v in enumerate(frame[col]):
                lo, hi = (frame[f"{col}_{e}"].iloc[i] if f"{col}_{e}" in frame else None for e in ("lo", "hi"))
                t = _interval_text(v, lo, hi, ".2f")
                if means.iloc[i] and f"{col}_std" in frame:  # a mean over seeds: +- std, not one run's interval
                    t = _spread_text(v, frame[f"{col}_std"].iloc[i], ".2f")
                consistent = frame[f"{col}_consistent"].iloc[i] if f"{col}_consistent" in frame else None
                if consistent is False or (isinstance(consistent, float) and consistent == 0.0):
                    t += " (!)"
                texts.append(t)
            out[col] = texts
    drop = [c for c in frame.columns if c.startswith(("stderr:", "std:")) or c.endswith(("_lo", "_hi", "_consistent",
                                                                                           "_std"))]
    drop += ["run_dir", "row_kind", "seed_group", "pruner_seed"]
    if not means.any():
        drop += ["n_seeds", "seeds"]
    if "removed_sub_blocks" in frame and not frame["removed_sub_blocks"].fillna("").astype(bool).any():
        drop += ["removed_sub_blocks", "attn_removed", "mlp_removed", "kv_removed_%"]
    if "healing" in frame and not frame["healing"].fillna("none").ne("none").any():  # no run was healed
        drop += [c for c in healing_columns({}) if c in frame]
    return out.drop(columns=drop, errors="ignore")


def seeds_note(frame: pd.DataFrame) -> str:
    """The sentence under the table that says how rows with ``n_seeds`` were made (empty when there are none)."""
    if "row_kind" not in frame or not (frame["row_kind"] == SEED_MEAN).any():
        return ""
    return ("\nRows with `n_seeds`: mean ± sample standard deviation (ddof 1) over that many runs that differ only "
            "in their seeds (column `seeds`); task scores, average, retention, perplexity and KL as mean ± std, other "
            "columns as means; rank = the range of the seeds' ranks. The per-seed rows, with their intervals, are "
            "in leaderboard.csv (`row_kind` = seed).\n")


def pairwise_markdown(pairs: list[dict]) -> str:
    """The pairwise significance table: difference of average-task accuracy (a - b), raw and Holm p."""
    if not pairs:
        return ""
    table = pd.DataFrame([{"model": p["model"], "ratio": p["ratio"], "a": p["a"], "b": p["b"],
                           "a - b": p["difference"], "p": p["p_value"], "p (Holm)": p["p_holm"],
                           "significant": "yes" if p["significant"] else "no"} for p in pairs])
    if any(p.get("healing", "none") != "none" for p in pairs):
        table.insert(2, "healing", [p.get("healing", "none") for p in pairs])
    return ("\n## Pairwise comparisons\n\nPaired randomisation test over examples on the average-task accuracy "
            f"(sign flips, {pairs[0]['iterations']} draws), Holm-corrected within each model x ratio x benchmark "
            f"x healing group (healed runs compared on their healed scores); significant at {ALPHA}. "
            "rank = 1 + methods significantly better.\n\n"
            + table.to_markdown(index=False, floatfmt=".4g") + "\n")


def write_leaderboard(frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "leaderboard.csv", "md": out_dir / "leaderboard.md"}
    atomic.write_text(paths["csv"], frame.to_csv(index=False))
    shown = display_frame(frame)
    atomic.write_text(paths["md"], shown.to_markdown(index=False, floatfmt=".4g") + "\n" + seeds_note(frame)
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
    frame = build_frame(records)
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
    shown = display_frame(frame).drop(columns=["removed_layers", "config_hash", "seed"], errors="ignore")
    print(shown.round(3).to_string(index=False))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if wanted:
        print(table_rows(frame)[wanted].to_markdown(index=False, floatfmt=".4g"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

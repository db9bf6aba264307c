"""Leaderboard plots: retention (or perplexity) vs compression ratio per method, per-task heatmap, and
quality against measured speed-up with the Pareto front of method x ratio.

A seed group (runs that differ only in their seeds) is drawn as its mean row, with error bars of one standard
deviation over the seeds; its per-seed rows are not drawn (`depthbench.experiments.leaderboard.table_rows`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from depthbench.experiments.leaderboard import SPREAD_COLUMNS, table_rows


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _seed_std(row, column: str):
    """The standard deviation over seeds of ``column`` in a seed-mean row (None for a single run)."""
    std = row.get(f"{column}_std") if column in SPREAD_COLUMNS else None
    return None if std is None or pd.isna(std) else float(std)


def _label(row) -> str:
    label = row.method if row.layers_removed == 0 else f"{row.method} r={row.ratio:g}"
    n = row.get("n_seeds")
    return label if n is None or pd.isna(n) else f"{label} ({int(n)} seeds)"


def _line_plot(frame: pd.DataFrame, column: str, ylabel: str, path: Path, log: bool = False):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    pruned = frame[frame["layers_removed"] > 0]
    for (model, method), group in pruned.dropna(subset=[column]).groupby(["model", "method"]):
        g = group.sort_values("ratio")
        label = f"{method} ({model})" if frame["model"].nunique() > 1 else method
        yerr = [_seed_std(r, column) or 0.0 for _, r in g.iterrows()]
        ax.errorbar(g["ratio"], g[column], yerr=yerr if any(yerr) else None, marker="o", capsize=2, label=label)
    ax.set_xlabel("compression ratio (fraction of layers removed)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better on both),
    ordered by the first coordinate."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _pareto_plot(frame: pd.DataFrame, quality: str, ylabel: str, path: Path) -> Path:
    plt = _pyplot()
    data = frame.dropna(subset=[quality, "speedup_prefill"]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for _, r in data.iterrows():
        lo, hi = r.get("speedup_prefill_lo"), r.get("speedup_prefill_hi")
        xerr = [[r.speedup_prefill - lo], [hi - r.speedup_prefill]] if pd.notna(lo) and pd.notna(hi) else None
        ylo, yhi = r.get(f"{quality}_lo"), r.get(f"{quality}_hi")
        yerr = [[r[quality] - ylo], [yhi - r[quality]]] if pd.notna(ylo) and pd.notna(yhi) else None
        xerr, yerr = xerr or _seed_std(r, "speedup_prefill"), yerr or _seed_std(r, quality)  # a seed mean: +- std
        ax.errorbar(r.speedup_prefill, r[quality], xerr=xerr, yerr=yerr, fmt="o", ms=5, capsize=2, alpha=0.8)
        ax.annotate(_label(r), (r.speedup_prefill, r[quality]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = pareto_front(list(zip(data["speedup_prefill"], data[quality])))
    if front:
        ax.plot(data["speedup_prefill"].iloc[front], data[quality].iloc[front], "k--", lw=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("measured prefill speed-up (x dense; 95% interval, or +- std over seeds)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_plots(frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = table_rows(frame)
    paths = {}
    if frame["ppl_pruned"].notna().any():
        paths["perplexity_plot"] = _line_plot(frame, "ppl_pruned", "held-out perplexity (pruned)",
                                              out_dir / "perplexity_vs_ratio.png", log=True)
    if "retention_%" in frame and frame["retention_%"].notna().any():
        paths["retention_plot"] = _line_plot(frame, "retention_%", "average retention (%)",
                                             out_dir / "retention_vs_ratio.png")
    if "speedup_prefill" in frame and frame["speedup_prefill"].notna().sum() > 1:
        if "average" in frame and frame["average"].notna().any():
            paths["pareto_plot"] = _pareto_plot(frame, "average",
                                                "average task accuracy (95% interval, or +- std over seeds)",
                                                out_dir / "quality_vs_speedup.png")
        elif frame["ppl_pruned"].notna().any():
            inv = frame.assign(neg_log_ppl=-frame["ppl_pruned"].astype(float).apply(math.log))
            paths["pareto_plot"] = _pareto_plot(inv, "neg_log_ppl", "-log held-out perplexity",
                                                out_dir / "quality_vs_speedup.png")
    task_columns = [c for c in frame.columns if c.startswith("task:")]
    if task_columns:
        plt = _pyplot()
        labels = [_label(r) for _, r in frame.iterrows()]
        values = frame[task_columns].astype(float).to_numpy()
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(task_columns), 1.0 + 0.4 * len(labels)))
        im = ax.imshow(values, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(task_columns)), [c[5:] for c in task_columns], rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(im, ax=ax, label="score")
        paths["task_heatmap"] = _save(fig, out_dir / "task_heatmap.png")
        plt.close(fig)
    return paths

"""Leaderboard plots: retention (or perplexity) vs compression ratio per method, per-task heatmap."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


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


def _line_plot(frame: pd.DataFrame, column: str, ylabel: str, path: Path, log: bool = False):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    pruned = frame[frame["layers_removed"] > 0]
    for (model, method), group in pruned.dropna(subset=[column]).groupby(["model", "method"]):
        g = group.sort_values("ratio")
        ax.plot(g["ratio"], g[column], marker="o", label=f"{method} ({model})" if frame["model"].nunique() > 1 else method)
    ax.set_xlabel("compression ratio (fraction of layers removed)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_plots(frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    if frame["ppl_pruned"].notna().any():
        paths["perplexity_plot"] = _line_plot(frame, "ppl_pruned", "held-out perplexity (pruned)",
                                              out_dir / "perplexity_vs_ratio.png", log=True)
    if "retention_%" in frame and frame["retention_%"].notna().any():
        paths["retention_plot"] = _line_plot(frame, "retention_%", "average retention (%)",
                                             out_dir / "retention_vs_ratio.png")
    task_columns = [c for c in frame.columns if c.startswith("task:")]
    if task_columns:
        plt = _pyplot()
        labels = [r.method if r.layers_removed == 0 else f"{r.method} r={r.ratio}" for r in frame.itertuples()]
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

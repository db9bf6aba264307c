"""Leaderboard plots: retention (or perplexity) vs compression ratio per method (and per healing budget), the
same against layer-equivalents removed when some method removed attention / MLP sub-blocks, per-task heatmap,
quality against measured speed-up with the Pareto front of method x ratio, and, in a healing sweep, each
method's perplexity and KL to the dense model before and after each healing budget.

A healed run is drawn with its healed metrics (``metrics.healed``), a run without healing with its pruned ones.

A seed group (runs that differ only in their seeds) is drawn as its mean row, with error bars of one standard
deviation over the seeds; its per-seed rows are not drawn (`depthbench.experiments.leaderboard.table_rows`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from depthbench.experiments.leaderboard import SPREAD_COLUMNS, table_rows

#: The metrics of the model a run ends with (``final_metrics``): final column, pruned column, healed column.
FINAL_COLUMNS = (("ppl_final", "ppl_pruned", "ppl_healed"), ("kl_final", "kl", "kl_healed"),
                 ("retention_final_%", "retention_%", "retention_healed_%"),
                 ("average_final", "average", "average_healed"))
FINAL_SUFFIXES = tuple(final for final, _, _ in FINAL_COLUMNS)


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
    std = row.get(f"{column}_std") if column in SPREAD_COLUMNS or column.endswith(FINAL_SUFFIXES) else None
    return None if std is None or pd.isna(std) else float(std)


def _is_healed(row) -> bool:
    healing = row.get("healing")
    return isinstance(healing, str) and healing != "none"


def healing_label(row) -> str:
    """``pruned only`` for a run without healing, else the healing method and its budget (``lora 32 steps``)."""
    if not _is_healed(row):
        return "pruned only"
    steps = row.get("healing_steps")
    return row["healing"] if steps is None or pd.isna(steps) else f"{row['healing']} {int(steps)} steps"


def _removed_units(row) -> str:
    """What a row removed: ``8 layers``, or its attention / MLP module counts when it removed sub-blocks."""
    if isinstance(row.get("removed_sub_blocks"), str) and row["removed_sub_blocks"]:
        return f"{int(row['attn_removed'])} attn + {int(row['mlp_removed'])} mlp"
    return f"{int(row['layers_removed'])} layers"


def _label(row) -> str:
    if row.layers_removed == 0 and not (isinstance(row.get("removed_sub_blocks"), str) and row["removed_sub_blocks"]):
        label = row.method
    else:
        label = f"{row.method} r={row.ratio:g} ({_removed_units(row)})"
    if _is_healed(row):
        label += f", {healing_label(row)}"
    n = row.get("n_seeds")
    return label if n is None or pd.isna(n) else f"{label} ({int(n)} seeds)"


def final_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the metrics of the model each run ends with: ``ppl_final``, ``kl_final``,
    ``retention_final_%`` and ``average_final`` (the healed model's where the run was healed, else the pruned
    model's; a healed run without healed metrics gets none), and its ``healing_label``."""
    frame = frame.copy()
    healed = pd.Series([_is_healed(r) for _, r in frame.iterrows()], index=frame.index, dtype=bool)
    missing = pd.Series(float("nan"), index=frame.index)

    def column(name):
        return frame[name].astype(float) if name in frame else missing

    for final, pruned_col, healed_col in FINAL_COLUMNS:
        # value, spread over seeds and 95% interval (the interval only where the pruned model is the final one)
        for suffix in ("", "_std", "_lo", "_hi"):
            healed_values = missing if suffix in ("_lo", "_hi") else column(healed_col + suffix)
            frame[final + suffix] = column(pruned_col + suffix).where(~healed, healed_values)
    frame["healing_label"] = [healing_label(r) for _, r in frame.iterrows()]
    return frame


def _pruned_rows(frame: pd.DataFrame) -> pd.DataFrame:
    removed = frame["layers_removed"] > 0
    if "removed_sub_blocks" in frame:
        removed |= frame["removed_sub_blocks"].fillna("").astype(str).astype(bool)
    return frame[removed]


def _line_plot(frame: pd.DataFrame, column: str, ylabel: str, path: Path, log: bool = False, x: str = "ratio",
               xlabel: str = "compression ratio (fraction of layers removed)"):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    several_models = frame["model"].nunique() > 1
    several_healings = frame["healing_label"].nunique() > 1
    rows = _pruned_rows(frame).dropna(subset=[column, x])
    colours = {key: f"C{i % 10}" for i, key in enumerate(sorted(set(zip(rows["model"], rows["method"]))))}
    styles = {h: ("-", "--", ":", "-.")[i % 4] for i, h in enumerate(sorted(set(rows["healing_label"]),
                                                                            key=lambda h: h != "pruned only"))}
    for (model, method, healing), group in rows.groupby(["model", "method", "healing_label"]):
        g = group.sort_values(x)
        label = method + (f" ({model})" if several_models else "") + (f", {healing}" if several_healings else "")
        yerr = [_seed_std(r, column) or 0.0 for _, r in g.iterrows()]
        ax.errorbar(g[x], g[column], yerr=yerr if any(yerr) else None, marker="o", capsize=2, label=label,
                    color=colours[(model, method)], linestyle=styles[healing])
    ax.set_xlabel(xlabel)
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


def _healing_plot(frame: pd.DataFrame, path: Path) -> Path:
    """Grouped bars: for each (model, method, ratio) that was healed, the held-out perplexity (and the KL to the
    dense model, where measured) of the pruned model and of each healing budget."""
    plt = _pyplot()
    rows = _pruned_rows(frame)
    healed_keys = {tuple(k) for k in rows[rows["healing_label"] != "pruned only"][["model", "method", "ratio"]]
                   .itertuples(index=False)}
    rows = rows[[tuple(k) in healed_keys for k in rows[["model", "method", "ratio"]].itertuples(index=False)]]
    groups = sorted(healed_keys, key=str)
    labels = ["pruned only"] + sorted(set(rows["healing_label"]) - {"pruned only"},
                                      key=lambda lab: (len(lab), lab))
    panels = [("ppl_final", "held-out perplexity", True)]
    if rows["kl_final"].notna().any():
        panels.append(("kl_final", "KL(dense || model) per token", False))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.2 * len(groups) * len(labels) / 2), 3.2 * len(panels)),
                             squeeze=False)
    width = 0.8 / len(labels)
    several_models = len({g[0] for g in groups}) > 1
    names = [f"{m}" + (f" ({model})" if several_models else "") + f"\nr={r:g}" for model, m, r in groups]
    for ax, (column, ylabel, log) in zip(axes[:, 0], panels):
        for j, lab in enumerate(labels):
            values = []
            for model, method, ratio in groups:
                match = rows[(rows["model"] == model) & (rows["method"] == method) & (rows["ratio"] == ratio)
                             & (rows["healing_label"] == lab)][column].dropna()
                values.append(float(match.iloc[0]) if len(match) else float("nan"))
            ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))], values, width, label=lab)
        ax.set_xticks(range(len(groups)), names, fontsize=8)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title("before and after healing (same pruned model)", fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_plots(frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = final_metrics(table_rows(frame))
    healed = (frame["healing_label"] != "pruned only").any()
    after = " (after healing where healed)" if healed else " (pruned)"
    paths = {}
    if frame["ppl_final"].notna().any():
        paths["perplexity_plot"] = _line_plot(frame, "ppl_final", "held-out perplexity" + after,
                                              out_dir / "perplexity_vs_ratio.png", log=True)
        sub_blocks = "removed_sub_blocks" in frame and frame["removed_sub_blocks"].fillna("").astype(str).astype(
            bool).any()
        if sub_blocks and frame["layer_equivalents"].notna().any():
            paths["perplexity_vs_removed_plot"] = _line_plot(
                frame, "ppl_final", "held-out perplexity" + after, out_dir / "perplexity_vs_layer_equivalents.png",
                log=True, x="layer_equivalents",
                xlabel="layer-equivalents removed (removed decoder parameters / one layer's)")
    if frame["retention_final_%"].notna().any():
        paths["retention_plot"] = _line_plot(frame, "retention_final_%", "average retention (%)" + after,
                                             out_dir / "retention_vs_ratio.png")
    if healed and frame["ppl_final"].notna().any():
        paths["healing_plot"] = _healing_plot(frame, out_dir / "healing_effect.png")
    if "speedup_prefill" in frame and frame["speedup_prefill"].notna().sum() > 1:
        if frame["average_final"].notna().any():
            paths["pareto_plot"] = _pareto_plot(frame, "average_final",
                                                "average task accuracy (95% interval, or +- std over seeds)",
                                                out_dir / "quality_vs_speedup.png")
        elif frame["ppl_final"].notna().any():
            inv = frame.assign(neg_log_ppl=-frame["ppl_final"].astype(float).apply(math.log))
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

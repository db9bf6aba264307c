"""Leaderboard plots: retention (or perplexity) vs compression ratio per method (and per healing budget), the
same against layer-equivalents removed when some method removed attention / MLP sub-blocks, per-task heatmap,
quality against measured speed-up with the Pareto front of method x ratio, and, in a healing sweep, each
method's perplexity and KL to the dense model before and after each healing budget.

A healed run is drawn with its healed metrics (``metrics.healed``), a run without healing with its pruned ones.

A seed group (runs that differ only in their seeds) is drawn as its mean row, with error bars of one standard
deviation over the seeds; its per-seed rows are not drawn (`depthbench.experiments.seed_rows.table_rows`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from depthbench import atomic
from depthbench.experiments.seed_rows import SPREAD_COLUMNS, table_rows

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


#: Markers cycled beside the colours: with 20 colours, (colour, marker) stays unique for 140 methods.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def method_styles(methods) -> dict[str, tuple]:
    """method -> (colour, marker), the same in every plot and every run: registered methods by their place in
    the sorted registry, others (plugins not installed here) after them by name."""
    plt = _pyplot()
    from depthbench.pruners.base import pruner_registry

    known = sorted(pruner_registry.names())
    order = known + sorted(set(methods) - set(known))
    cmap = plt.get_cmap("tab20")
    colours = [cmap(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]  # the 10 strong hues first
    return {m: (colours[order.index(m) % 20], MARKERS[order.index(m) % len(MARKERS)]) for m in methods}


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks at 1, 2, 5 x 10^k written as plain numbers (a reader compares 1.2 and 2.2, not 10^0.08)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(NullFormatter())


def _legend_outside(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def _save(fig, path: Path) -> Path:
    with atomic.file(path) as tmp:  # the format from the final name: the temporary one ends in .tmp
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
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


def _with_healing_and_seeds(label: str, row) -> str:
    """``label`` followed by the row's healing (where healed) and its number of seeds (a seed mean)."""
    if _is_healed(row):
        label += f", {healing_label(row)}"
    n = row.get("n_seeds")
    return label if n is None or pd.isna(n) else f"{label} ({int(n)} seeds)"


def _label(row) -> str:
    if row.layers_removed == 0 and not (isinstance(row.get("removed_sub_blocks"), str) and row["removed_sub_blocks"]):
        return _with_healing_and_seeds(row.method, row)
    return _with_healing_and_seeds(f"{row.method} r={row.ratio:g} ({_removed_units(row)})", row)


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
    style = method_styles(set(rows["method"]))
    styles = {h: ("-", "--", ":", "-.")[i % 4] for i, h in enumerate(sorted(set(rows["healing_label"]),
                                                                            key=lambda h: h != "pruned only"))}
    for (model, method, healing), group in rows.groupby(["model", "method", "healing_label"]):
        g = group.sort_values(x)
        label = method + (f" ({model})" if several_models else "") + (f", {healing}" if several_healings else "")
        yerr = [_seed_std(r, column) or 0.0 for _, r in g.iterrows()]
        colour, marker = style[method]
        ax.errorbar(g[x], g[column], yerr=yerr if any(yerr) else None, marker=marker, capsize=2, label=label,
                    color=colour, linestyle=styles[healing])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
        _clip_outliers(ax, rows[column].astype(float), log=True, names=[r.method for _, r in rows.iterrows()],
                       xs=rows[x].astype(float))
    ax.grid(alpha=0.3)
    _legend_outside(ax)
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
    style = method_styles(set(data["method"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for _, r in data.iterrows():
        lo, hi = r.get("speedup_prefill_lo"), r.get("speedup_prefill_hi")
        xerr = [[r.speedup_prefill - lo], [hi - r.speedup_prefill]] if pd.notna(lo) and pd.notna(hi) else None
        ylo, yhi = r.get(f"{quality}_lo"), r.get(f"{quality}_hi")
        yerr = [[r[quality] - ylo], [yhi - r[quality]]] if pd.notna(ylo) and pd.notna(yhi) else None
        xerr, yerr = xerr or _seed_std(r, "speedup_prefill"), yerr or _seed_std(r, quality)  # a seed mean: +- std
        colour, marker = style[r.method]
        ax.errorbar(r.speedup_prefill, r[quality], xerr=xerr, yerr=yerr, marker=marker, color=colour, ms=6,
                    capsize=2, alpha=0.85, linestyle="none", label=_label(r))
    front = pareto_front(list(zip(data["speedup_prefill"], data[quality])))
    if front:
        ax.plot(data["speedup_prefill"].iloc[front], data[quality].iloc[front], "k--", lw=1, label="Pareto front")
    _legend_outside(ax)
    ax.set_xlabel("measured prefill speed-up (x dense; 95% interval, or +- std over seeds)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _bounds(values: pd.Series, log: bool) -> tuple[float, float] | None:
    """The axis range that holds the bulk of ``values``: 3 interquartile ranges (at least 1 decade, on a log axis)
    beyond the quartiles; None when there are too few values to call one an outlier."""
    v = values.astype(float)
    v = v[v > 0] if log else v
    v = (v.apply(math.log10) if log else v).dropna()
    if len(v) < 4:
        return None
    q1, q3 = v.quantile(0.25), v.quantile(0.75)
    spread = max(q3 - q1, 1.0 if log else 0.1 * max(abs(q3), 1e-12))
    lo, hi = q1 - 3 * spread, q3 + 3 * spread
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


def _clip_outliers(ax, values: pd.Series, log: bool, names: list[str], xs: pd.Series) -> list[int]:
    """Limit the y axis to `_bounds` when a value lies beyond it, and name each such value at the edge (with an
    arrow pointing out of the plot); returns the positions of the outliers."""
    bounds = _bounds(values, log)
    if bounds is None:
        return []
    lo, hi = bounds
    outside = [i for i, v in enumerate(values.astype(float)) if v > hi or v < lo]
    if not outside:
        return []
    inside = values.astype(float)[[i not in outside for i in range(len(values))]]
    pad = 1.5 if log else 0.05 * (inside.max() - inside.min() or 1.0)
    top = min(hi, inside.max() * pad if log else inside.max() + pad)
    bottom = max(lo, inside.min() / pad if log else inside.min() - pad)
    ax.set_ylim(bottom, top)
    for k, i in enumerate(outside):
        above = float(values.iloc[i]) > top
        edge = top if above else bottom
        ax.annotate(f"{names[i]}: {float(values.iloc[i]):.3g} {'(above)' if above else '(below)'}",
                    (float(xs.iloc[i]), edge), xytext=(0, (-12 - 10 * k) if above else (12 + 10 * k)),
                    textcoords="offset points", fontsize=7, ha="center",
                    arrowprops={"arrowstyle": "->", "lw": 0.6}, annotation_clip=False)
    return outside


def _dodged(xs: pd.Series, ys: pd.Series, width: float = 0.06, from_zero: bool = False) -> pd.Series:
    """x positions with points that share an x (the same compression) spread side by side, ordered by y, over
    ``width`` of the axis (from 0 with ``from_zero``, else the x range; at least 1): a strip, not a stack."""
    span = max(float(xs.max() if from_zero else xs.max() - xs.min()), 1.0)
    out = xs.copy()
    for _, same in xs.groupby(xs.round(6)):
        order = ys.loc[same.index].sort_values().index
        for j, idx in enumerate(order):
            out.loc[idx] = xs.loc[idx] + (j - (len(order) - 1) / 2) * width * span / max(len(order) - 1, 1)
    return out


def _point_label(row, several_ratios: bool) -> str:
    return _with_healing_and_seeds(row.method + (f" r={row.ratio:g}" if several_ratios else ""), row)


def _error(row, column: str, se_column: str | None = None):
    """One standard deviation over seeds for a seed mean; else the run's standard error where known."""
    std = _seed_std(row, column)
    if std is not None:
        return std
    se = row.get(se_column) if se_column and not _is_healed(row) else None
    return None if se is None or pd.isna(se) else float(se)


def _metric_plot(frame: pd.DataFrame, y: str, ylabel: str, x: str, xlabel: str, path: Path, y_se: str | None = None,
                 x_interval: bool = False, front: bool = False, x_from_zero: bool = False) -> Path:
    """The ranking metric (log scale, lower is better) against ``x``: one point per run with its error bars, a
    colour and marker per method (`method_styles`) named in a legend beside the axes, values far beyond the
    others drawn at the edge and named (`_clip_outliers`); ``front``: the Pareto front (lower y, higher x)."""
    plt = _pyplot()
    rows = _pruned_rows(frame).dropna(subset=[y, x])
    rows = rows[rows[y].astype(float) > 0].reset_index(drop=True)
    style = method_styles(set(rows["method"]))
    several_ratios = rows["ratio"].nunique() > 1
    positions = rows[x].astype(float) if x_interval else _dodged(rows[x].astype(float), rows[y].astype(float),
                                                                 from_zero=x_from_zero)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, r in rows.iterrows():
        colour, marker = style[r.method]
        xerr = _error(r, x)
        interval = pd.notna(r.get(f"{x}_lo")) and pd.notna(r.get(f"{x}_hi")) and r.get("row_kind") != "seed mean"
        if x_interval and interval:
            xerr = [[r[x] - r[f"{x}_lo"]], [r[f"{x}_hi"] - r[x]]]
        ax.errorbar(positions.iloc[i], r[y], xerr=xerr, yerr=_error(r, y, y_se), marker=marker, color=colour, ms=6,
                    capsize=2, linestyle="none", label=_point_label(r, several_ratios))
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    if x_from_zero:  # an axis of compression starts at none removed
        ax.set_xlim(0, float(positions.max()) * 1.1 if len(positions) else 1.0)
    outside = _clip_outliers(ax, rows[y], log=True, names=[_point_label(r, several_ratios) for _, r in rows.iterrows()],
                             xs=positions)
    if front:
        kept = [i for i in range(len(rows)) if i not in outside]
        points = [(float(rows[x].iloc[i]), -float(rows[y].iloc[i])) for i in kept]
        on_front = [kept[j] for j in pareto_front(points)]
        if len(on_front) > 1:
            ax.plot(rows[x].iloc[on_front], rows[y].iloc[on_front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax)
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
    timed = "speedup_prefill" in frame and frame["speedup_prefill"].notna().sum() > 1
    if timed and frame["average_final"].notna().any():
        paths["pareto_plot"] = _pareto_plot(frame, "average_final",
                                            "average task accuracy (95% interval, or +- std over seeds)",
                                            out_dir / "quality_vs_speedup.png")
    kl_label = "KL(dense || model) per token" + after + "\n(bars: SE over windows, or std over seeds)"
    if frame["kl_final"].notna().any():
        has_equivalents = "layer_equivalents" in frame and frame["layer_equivalents"].notna().any()
        compression = "layer_equivalents" if has_equivalents else "params_removed_no_emb_%"
        paths["kl_vs_compression_plot"] = _metric_plot(
            frame, "kl_final", kl_label, compression,
            ("layer-equivalents removed (removed decoder parameters / one layer's)" if compression ==
             "layer_equivalents" else "% of non-embedding parameters removed") + "; equal ones side by side",
            out_dir / "kl_vs_compression.png",
            y_se="kl_se", x_from_zero=True)
        if "speedup_decode" in frame and frame["speedup_decode"].notna().any():
            paths["kl_vs_speedup_plot"] = _metric_plot(
                frame, "kl_final", kl_label, "speedup_decode",
                "measured decode speed-up (x dense; 95% interval, or std over seeds)", out_dir / "kl_vs_speedup.png",
                y_se="kl_se", x_interval=True, front=True)
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

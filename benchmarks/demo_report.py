"""docs/DEMO.md from a finished `make demo`: the command, its wall time and the machine, how many cells this
invocation ran (a rerun finds finished cells by their config hash and runs none), the leaderboard as
`depthbench-leaderboard` wrote it (ranks, intervals, fidelity, pairwise tests) with its plots, and whether the
ranking separates ReplaceMe-LS from UIDL: their pair in the leaderboard's paired test over held-out windows on
KL(dense || pruned) per token (`depthbench.experiments.ranking`), with its Holm-adjusted p.

    .venv/bin/python benchmarks/demo_report.py --sweep outputs/sweeps/leaderboard --started EPOCH --seconds S \\
        --command "make demo" [--output docs/DEMO.md]

`make demo` calls it last; `make leaderboard-all` calls it with ``--output docs/LEADERBOARD.md --images
leaderboard --title ...`` for its own sweep. A table of each cell's prune and wall time follows the leaderboard.
Nothing here is typed in: every number is read from the sweep's result records and leaderboard files.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

from depthbench.benchmarks._record import machine_fields

ROOT = Path(__file__).resolve().parents[1]
DEMO_TITLE = "The demo: `make demo` on the project's CPU machine"


def separation(frame, first: str = "replaceme_ls", second: str = "uidl") -> dict | None:
    """The leaderboard's paired test of ``first`` against ``second`` (no healing), with their KL, standard errors,
    ranks, perplexity and top-1 agreement; None when the sweep did not compare the two."""
    def method(label: str) -> str:  # a seed group's label is "<method> (N seeds)"
        return label.split(" (")[0]

    pair = next((p for p in frame.attrs.get("pairs", []) if p.get("healing", "none") == "none"
                 and {method(p["a"]), method(p["b"])} == {first, second}), None)
    if pair is None:
        return None
    # the two runs of that pair's group (a sweep over ratios has one run of each method per group)
    rows = frame[frame["row_kind"].isin(["run", "seed mean"]) & (frame["healing"] == "none")
                 & (frame["model"] == pair["model"]) & (frame["compared_at"] == pair["compared_at"])]
    a, b = (rows[rows["method"] == method].iloc[0] for method in (first, second))
    return {"first": first, "second": second, "metric": pair["metric"], "better": method(pair["a"]),
            "difference": pair["difference"], "p": pair["p_value"], "p_holm": pair["p_holm"],
            "significant": pair["significant"], "ranks": (a["rank"], b["rank"]),
            "kl": (float(a["kl"]), float(b["kl"])), "kl_se": (float(a["kl_se"]), float(b["kl_se"])),
            "top1": (a.get("top1_agree_%"), b.get("top1_agree_%")),
            "ppl": (float(a["ppl_pruned"]), float(b["ppl_pruned"]))}


def cell_times(records: list[dict]) -> list[str]:
    """A table of each cell's prune time (its prune.* stages) and wall time, slowest first, from the records."""
    rows = []
    for r in records:
        stages = r.get("stages") or {}
        prune = sum(v["seconds"] for k, v in stages.items() if k.startswith("prune."))
        rows.append((r.get("wall_seconds") or 0.0, prune, r["method"], r["ratio"], r.get("seed", 0)))
    lines = ["| method | ratio | seed | prune s | cell wall s |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {ratio:g} | {seed} | {prune:.1f} | {wall:.1f} |"
              for wall, prune, m, ratio, seed in sorted(rows, reverse=True)]
    total = sum(row[0] for row in rows)
    return lines + ["", f"Sum of the cells' wall times: {total / 60:.1f} min. Cells share the calibration cache: the "
                        "first cell that needs the per-layer statistics pays for their pass in its prune time."]


def budgets(records: list[dict]) -> list[str]:
    """Per method: the calibration tokens it read, the tokens that scored its candidates (a declared subset, for
    the methods that re-score the model per candidate), its training steps, and the seeds it ran with; from the
    records (the first seed's where seeds differ only in the draw)."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    lines = ["| method | calibration tokens | candidates scored on | train steps | seeds |", "|---|---|---|---|---|"]
    for method, runs in sorted(by_method.items()):
        first = min(runs, key=lambda r: r.get("seed", 0))
        pruning = first.get("pruning") or {}
        budget, scores = pruning.get("budget") or {}, pruning.get("scores") or {}
        scored = (f"{scores['scored_samples']} sequences, {scores['scored_tokens']:,} tokens"
                  if scores.get("scored_tokens") is not None else "")
        seeds = ", ".join(str(x) for x in sorted({r.get("seed", 0) for r in runs}))
        lines.append(f"| {method} | {budget.get('calibration_tokens', 0):,} | {scored} | "
                     f"{budget.get('optimizer_steps', 0):,} | {seeds} |")
    return lines


def benchmark_sentence(bench: dict) -> str:
    """What the runs' task benchmark was, in words."""
    tasks = ", ".join(t["name"] for t in bench.get("tasks") or [])
    if not tasks:
        return "no task benchmark (`benchmark=none`)."
    if all(t.get("metric") == "bits_per_byte" for t in bench["tasks"]):
        return (f"the gold-solution bits-per-byte group (`benchmark={bench.get('name')}`: {tasks}; lower is better, "
                f"never in a task average), {bench.get('limit')} documents each, a seeded sample (seed "
                f"{bench.get('sample_seed', 0)}), the same for every method.")
    return (f"tasks: {tasks}, {bench.get('limit')} examples each, a sample stratified by source "
            f"({bench.get('limit_sampling', 'stratified')}, seed {bench.get('sample_seed', 0)}; the same examples for "
            "every method; the demo's CPU budget: `DEMO_LIMIT` in the Makefile; the full standard suite is "
            "`depthbench experiment=leaderboard` with the default limit 200, or `benchmark.limit=null`).")


def render(sweep: Path, started: float, seconds: float, command: str, docs: Path, title: str = DEMO_TITLE,
           images_dir: str = "demo") -> str:
    from depthbench.experiments.leaderboard import RESULT_FILE, build_frame, load_records
    from depthbench.provenance import package_versions

    records = load_records([sweep])
    if not records:
        raise SystemExit(f"demo_report: no {RESULT_FILE} under {sweep}")
    fresh = sum(1 for r in records if (Path(r["_path"]) / RESULT_FILE).stat().st_mtime >= started)
    frame = build_frame(records)
    table = (sweep / "leaderboard.md").read_text()
    images = docs / images_dir
    images.mkdir(exist_ok=True)
    plots = sorted((sweep / "plots").glob("*.png"))
    for stale in set(images.glob("*.png")) - {images / p.name for p in plots}:  # plots this version no longer draws
        stale.unlink()
    for plot in plots:
        shutil.copyfile(plot, images / plot.name)
    config = records[0].get("config") or {}
    bench, cal = config.get("benchmark") or {}, config.get("calibration") or {}
    versions = package_versions()
    machine = machine_fields()
    sep = separation(frame)
    lines = [
        f"# {title}", "",
        f"Produced by `{command}` started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"{platform.machine()}, {machine['cpus']} CPU cores, "
        f"torch {versions.get('torch')}, transformers {versions.get('transformers')}, lm-eval "
        f"{versions.get('lm_eval')}, model dtype {records[0]['model'].get('dtype')} (as the runs recorded it). "
        f"Load average when this page was rendered (by `make demo`: right after the run) "
        f"{', '.join(f'{x:.1f}' for x in machine['load_average_at_end'])}.",
        "",
        f"Wall time of this invocation: **{seconds / 60:.1f} min** ({seconds:.0f} s, set-up excluded); it ran "
        f"{fresh} of the {len(records)} cells in `{sweep}` (the others were found finished by their config hash).",
        "",
        f"Each method removes the same ratio of layers ({records[0]['ratio']:g}), calibrated on "
        f"{cal.get('n_samples')} x {cal.get('seq_len')} tokens ({cal.get('name', cal.get('source', ''))}; the same "
        f"draw for every method of a seed); held-out perplexity and the fidelity to the dense model (KL, top-1 "
        f"agreement) are on held-out text that calibration never sees; " + benchmark_sentence(bench),
        "",
        "## Does the ranking separate ReplaceMe-LS from UIDL?", "",
    ]
    if sep is None:
        lines.append("Not measured: the leaderboard did not compare replaceme_ls and uidl (no KL for both, or "
                     "different groups).")
    else:
        lines.append(
            f"KL(dense || pruned) per token: {sep['first']} {sep['kl'][0]:.3f} +- {sep['kl_se'][0]:.3f}, "
            f"{sep['second']} {sep['kl'][1]:.3f} +- {sep['kl_se'][1]:.3f} (standard errors over windows). The "
            f"leaderboard's paired test over the same held-out windows ({sep['metric']}): {sep['better']} is better by "
            f"{abs(sep['difference']):.3f}, p = {sep['p']:.2g}, Holm-adjusted p = {sep['p_holm']:.2g}: "
            + ("**significant**" if sep["significant"] else "**not significant** at 0.05")
            + f"; ranks {sep['ranks'][0]} and {sep['ranks'][1]}. Held-out perplexity {sep['ppl'][0]:.4g} vs "
            f"{sep['ppl'][1]:.4g}; top-1 agreement {sep['top1'][0]:.1f}% vs {sep['top1'][1]:.1f}%.")
    lines += ["", "## Leaderboard (`depthbench-leaderboard " + str(sweep) + "`)", "", table.strip(), "",
              "## Budgets", "", *budgets(records), "",
              "## Time per cell", "", *cell_times(records), "", "## Plots", ""]
    lines += [f"![{p.stem}]({images_dir}/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("outputs/sweeps/leaderboard"))
    parser.add_argument("--started", type=float, required=True, help="UNIX time the demo started")
    parser.add_argument("--seconds", type=float, required=True, help="its wall time")
    parser.add_argument("--command", default="make demo")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "DEMO.md")
    parser.add_argument("--title", default=DEMO_TITLE, help="the page's heading")
    parser.add_argument("--images", default="demo", help="folder beside --output that receives the plots")
    args = parser.parse_args()
    from depthbench import atomic

    atomic.write_text(args.output, render(args.sweep, args.started, args.seconds, args.command, args.output.parent,
                                          args.title, args.images))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

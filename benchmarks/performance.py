"""Pruning cost on the embedded SmolLM2: time and peak memory per method, a whole sweep against
independent runs, and ReplaceMe-cosine's memory as the calibration set grows. Writes
docs/PERFORMANCE.md (with the machine it ran on).

    .venv/bin/python benchmarks/performance.py [--samples 128] [--sweep-samples 32] [--memory-samples N]

Every figure is a ratio or a peak measured in the same run, each cell in its own process (so each
peak RSS is that cell's own). The machine is shared and noisy: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["replaceme_ls", "replaceme_cosine", "uidl", "llm_streamline", "shortgpt"]
RATIOS = [0.125, 0.25, 0.375]
ROOT = Path(__file__).resolve().parents[1]


def cell(*overrides: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_cell.py"), *overrides, "progress=false",
                           "logger=none"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"cell {overrides} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep_in_one_process(samples: int, cache_dir: str) -> float:
    """All 15 cells through the real CLI as one Hydra multirun sharing one statistics cache."""
    out = Path(cache_dir) / "sweep"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "depthbench.cli", "-m", f"pruner={','.join(METHODS)}",
                           f"ratio={','.join(map(str, RATIOS))}", f"calibration.n_samples={samples}",
                           "evaluate=false", "save_model=false", "logger=none", "progress=false",
                           f"hydra.sweep.dir={out}"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    wall = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in out.glob(".cache/statistics/activations-*/*"))
    per_method = {m: 0.0 for m in METHODS}
    for path in out.rglob("result.json"):
        record = json.loads(path.read_text())
        per_method[record["config"]["pruner"]["name"]] += sum(
            s["seconds"] for k, s in record["stages"].items() if k.startswith("prune."))
    return per_method, wall, stored


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--sweep-samples", type=int, default=32)
    parser.add_argument("--memory-samples", type=int, default=None, help="1x of the memory part (default: --samples)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    parser.add_argument("--parts", default="methods,sweep,memory",
                        help="comma-separated subset of: methods, sweep, memory")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    args.memory_samples = args.memory_samples or args.samples
    lines = [
        "# Performance",
        "",
        f"Produced by `python benchmarks/performance.py --samples {args.samples} --sweep-samples {args.sweep_samples}"
        f" --memory-samples {args.memory_samples}"
        f" --parts {args.parts}`"
        f" on {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
        "Model: SmolLM2-135M-Instruct (bfloat16), calibration: BIG-bench Wikipedia, 256 tokens per sequence.",
        "The machine is shared: read the ratios, not the seconds.",
    ]

    def write() -> None:  # after every section, so an interrupted run leaves a valid partial report
        Path(args.output).write_text("\n".join(lines) + "\n")

    lines += ["", "## Against issue #6's targets", "", "| target | measured | met |", "|---|---|---|"]
    targets_at = len(lines)
    verdicts: list[str] = []

    def verdict(target: str, measured: str, met: bool) -> None:
        verdicts.append(f"| {target} | {measured} | {'yes' if met else 'NO'} |")
        lines[targets_at:targets_at + len(verdicts) - 1] = verdicts
        write()

    if "methods" in parts:
        methods_section(args, lines, write, verdict)
    if "sweep" in parts:
        sweep_section(args, lines, write, verdict)
    if "memory" in parts:
        memory_section(args, lines, write, verdict)
    print(f"wrote {args.output}")


def methods_section(args, lines: list[str], write, verdict) -> None:
    lines += [
        "",
        f"## Prune time and peak RSS per method (ratio 0.25, {args.samples} x 256 tokens, no shared cache)",
        "",
        "`bare forward` is one forward pass over the same calibration batches (no hooks), timed in the same",
        "process just before pruning. `score` is the method's one calibration pass (for ReplaceMe and",
        "Streamline it also stores every layer's activations, in a temporary directory here); `fit` reads",
        "what it needs back from them (and trains, for cosine and Streamline).",
        "",
        "| method | prune s | score s | fit s | bare forward s | prune / forward | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        r = cell(f"pruner={method}", "ratio=0.25", f"calibration.n_samples={args.samples}")
        ratio = r["prune_s"] / r["bare_forward_s"]
        lines.append(f"| {method} | {r['prune_s']:.1f} | {r['stages']['score']['seconds']:.1f} | "
                     f"{r['stages']['fit']['seconds']:.1f} | {r['bare_forward_s']:.1f} | {ratio:.2f}x | "
                     f"{mib(r['peak_rss_bytes'])} |")
        print(lines[-1], flush=True)
        write()
        if method == "replaceme_ls":
            verdict("ReplaceMe-LS prune <= 1.2x a bare forward pass", f"{ratio:.2f}x", ratio <= 1.2)


def sweep_section(args, lines: list[str], write, verdict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        independent = 0.0
        for method in METHODS:
            for ratio in RATIOS:
                independent += cell(f"pruner={method}", f"ratio={ratio}", f"calibration.n_samples={args.sweep_samples}")["prune_s"]
        per_method, wall, stored = sweep_in_one_process(args.sweep_samples, tmp)
        shared = sum(per_method.values())
        single = cell("pruner=replaceme_ls", "ratio=0.25", f"calibration.n_samples={args.sweep_samples}")["prune_s"]
    lines += [
        "",
        f"## A 5-method x 3-ratio sweep ({args.sweep_samples} x 256 tokens)",
        "",
        "| | prune s | / one ReplaceMe-LS run |",
        "|---|---|---|",
        f"| 15 independent runs (no shared cache) | {independent:.1f} | {independent / single:.1f}x |",
        f"| one sweep, shared statistics cache | {shared:.1f} | {shared / single:.1f}x |",
        "",
        f"(One ReplaceMe-LS run: {single:.1f} s; the sweep's whole wall time incl. model loads: {wall:.0f} s.)",
        "",
        "The sweep's pruning seconds by method (3 ratios each; its first cell, ReplaceMe-LS at the first",
        "ratio, makes the one forward pass): " + ", ".join(f"{m} {v:.1f}" for m, v in per_method.items()) + ".",
        f"Stored activations on disk after the sweep: {stored / 1e6:.0f} MB.",
    ]
    print("\n".join(lines[-12:]), flush=True)
    write()
    verdict("15-cell sweep's pruning < 3x one run's", f"{shared / single:.2f}x", shared / single < 3)


def memory_section(args, lines: list[str], write, verdict) -> None:
    lines += ["", "## ReplaceMe-cosine peak RSS vs calibration size", "",
              "| calibration | token rows | peak RSS | vs 1x |", "|---|---|---|---|"]
    base_rss = None
    for factor in (1, 2, 4):
        r = cell("pruner=replaceme_cosine", "ratio=0.25", f"calibration.n_samples={args.memory_samples * factor}",
                 "pruner.options.epochs=1")
        base_rss = base_rss or r["peak_rss_bytes"]
        lines.append(f"| {factor}x ({r['n_samples']} x 256) | {r['n_tokens']} | {mib(r['peak_rss_bytes'])} | "
                     f"{100 * (r['peak_rss_bytes'] / base_rss - 1):+.1f}% |")
        print(lines[-1], flush=True)
        write()
    lines += ["", "(cosine with 1 epoch here: memory does not depend on the number of epochs.)", ""]
    write()
    growth = r["peak_rss_bytes"] / base_rss - 1
    verdict("ReplaceMe-cosine peak RSS grows < 10% from 1x to 4x calibration", f"{100 * growth:+.1f}%", growth < 0.10)


if __name__ == "__main__":
    main()

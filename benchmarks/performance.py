"""Pruning cost on the embedded SmolLM2: time and peak memory per method, a whole sweep against
independent runs, and ReplaceMe-cosine's memory as the calibration set grows. Writes
docs/performance.json (the measurements) and docs/PERFORMANCE.md (rendered from it, with the machine
and the command of each part).

    .venv/bin/python benchmarks/performance.py [--samples 128] [--sweep-samples 32] [--memory-samples N]
                                               [--parts methods,sweep,memory]

``--parts`` remeasures only the parts named; the others keep their earlier measurements (each part
says when and how it was measured). Every figure is a ratio or a peak measured within one part, each
cell in its own process (so each peak RSS is that cell's own). The machine is shared and noisy:
compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from depthbench.calibration.activations import STORE_PREFIX
from depthbench import atomic

METHODS = ["replaceme_ls", "replaceme_cosine", "uidl", "llm_streamline", "shortgpt"]
RATIOS = [0.125, 0.25, 0.375]
PARTS = ("methods", "sweep", "memory")
ROOT = Path(__file__).resolve().parents[1]
# The memory part's stored-activations path must store at every size whatever the default budget
# (at --memory-samples 64 the 4x store is 3.4 GB, close to the default 4 GiB).
STORE_BUDGET_GB = 16


def cell(*overrides: str) -> dict:
    """One cell in its own process (benchmarks/_cell.py: the pipeline's steps), without the statistics cache: each
    cell makes its own calibration pass, as the first run on a model does."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_cell.py"), *overrides,
                           "cache.statistics=false", "progress=false", "logger=none"], cwd=ROOT, capture_output=True,
                          text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"cell {overrides} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep_in_one_process(samples: int, directory: str) -> tuple[dict, float, int]:
    """All 15 cells through the real CLI as one Hydra multirun sharing one statistics cache."""
    out = Path(directory) / "sweep"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "depthbench.cli", "-m", f"pruner={','.join(METHODS)}",
                           f"ratio={','.join(map(str, RATIOS))}", f"calibration.n_samples={samples}",
                           "evaluate=false", "save_model=false", "logger=none", "progress=false",
                           "cache.keep_activations=true", f"hydra.sweep.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    wall = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in out.glob(f".cache/statistics/{STORE_PREFIX}*/*"))
    per_method = {m: 0.0 for m in METHODS}
    for path in out.rglob("result.json"):
        record = json.loads(path.read_text())
        per_method[record["config"]["pruner"]["name"]] += sum(
            s["seconds"] for k, s in record["stages"].items() if k.startswith("prune."))
    return per_method, wall, stored


# -- measurements (each returns the JSON-able record of its part) -------------------------------
# Each method with its defaults (the pipeline's), then the trained ones as described below.
# The trained methods again with the store and the training rows on disk: what the defaults' memory saves here.
METHOD_CELLS = [(m, [f"pruner={m}"]) for m in METHODS] + [
    (f"{m}, cache.activations_memory_gb=0", [f"pruner={m}", "cache.activations_memory_gb=0"])
    for m in ("replaceme_cosine", "llm_streamline")]


def measure_methods(args) -> dict:
    rows = []
    for label, overrides in METHOD_CELLS:
        r = cell(*overrides, "ratio=0.25", f"calibration.n_samples={args.samples}")
        rows.append({"method": label, "dtype": r["dtype"], "prune_s": r["prune_s"],
                     "score_s": r["stages"]["score"]["seconds"],
                     "fit_s": r["stages"]["fit"]["seconds"], "bare_forward_s": r["bare_forward_s"],
                     "peak_rss_bytes": r["peak_rss_bytes"], "activations_stored": r["activations_stored"],
                     "activations": r["activations"], "training_precision": r.get("training_precision"),
                     "training_rows": r.get("training_rows")})
        print(rows[-1], flush=True)
    return {"samples": args.samples, "rows": rows}


def measure_sweep(args) -> dict:
    independent = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            for ratio in RATIOS:
                independent[f"{method}@{ratio}"] = cell(f"pruner={method}", f"ratio={ratio}",
                                                        f"calibration.n_samples={args.sweep_samples}")["prune_s"]
                print(method, ratio, independent[f"{method}@{ratio}"], flush=True)
        per_method, wall, stored = sweep_in_one_process(args.sweep_samples, tmp)
        single_ls = cell("pruner=replaceme_ls", "ratio=0.25", f"calibration.n_samples={args.sweep_samples}")["prune_s"]
    return {"samples": args.sweep_samples, "independent_s": independent, "sweep_by_method_s": per_method,
            "sweep_wall_s": wall, "stored_bytes": stored, "single_ls_s": single_ls}


def measure_memory(args) -> dict:
    paths = {}
    for path, budget in (("stored activations", STORE_BUDGET_GB), ("no store (activations_gb=0)", 0)):
        rows = []
        for factor in (1, 2, 4):
            r = cell("pruner=replaceme_cosine", "ratio=0.25", f"calibration.n_samples={args.memory_samples * factor}",
                     "pruner.options.epochs=1", f"cache.activations_gb={budget}", "cache.activations_memory_gb=0",
                     "cache.activation_strategy=store")
            if r["activations_stored"] != (budget > 0):
                raise RuntimeError(f"{path} at {factor}x: the store was{'' if r['activations_stored'] else ' not'} "
                                   f"used ({r['activation_store_bytes'] / 1e9:.1f} GB, budget {budget} GiB)")
            rows.append({"factor": factor, "n_samples": r["n_samples"], "n_tokens": r["n_tokens"],
                         "peak_rss_bytes": r["peak_rss_bytes"], "prune_s": r["prune_s"],
                         "store_bytes": r["activation_store_bytes"] if budget else 0})
            print(path, rows[-1], flush=True)
        paths[path] = rows
    return {"samples": args.memory_samples, "paths": paths}


MEASURE = {"methods": measure_methods, "sweep": measure_sweep, "memory": measure_memory}


# -- rendering ----------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def provenance(part: dict) -> str:
    e = part["environment"]
    kernels = ("" if "cpu_bfloat16_kernels" not in e else
               f" ({'with' if e['cpu_bfloat16_kernels'] else 'without'} bfloat16 kernels)")
    return (f"Measured {e['date']} at commit {e.get('commit', 'unknown')} on {e['machine']}, {e['cpus']} CPUs"
            f"{kernels}, Python {e['python']}, torch {e['torch']}, by `{e['command']}`.")


def render_methods(part: dict, verdicts: list) -> list[str]:
    lines = [f"## Prune time and peak RSS per method (ratio 0.25, {part['samples']} x 256 tokens, no shared cache)",
             "", provenance(part), "",
             "`bare forward` is one forward pass over the same calibration batches (no hooks), timed in the same",
             "process just before pruning. `score` is the method's one calibration pass (for ReplaceMe and",
             "Streamline it also stores every layer's activations, where the `activations` column says: with the",
             "pipeline's defaults since 2026-12-08, in memory where they fit `cache.activations_memory_gb`; in a",
             "temporary directory before); `fit` reads what it needs back from them (and trains, for cosine and",
             "Streamline, on rows kept where `training rows` says). `training` is the arithmetic of Streamline's",
             "training (`pruner.options.precision`; default auto = bf16-mixed on a bfloat16 model, float32 on a",
             "float32 one). Each cell runs the pipeline's own steps in its own process, without the statistics cache.",
             *([f"Model dtype: {', '.join(sorted({r['dtype'] for r in part['rows']}))} (`model.dtype=auto` on this "
                "machine)."] if all("dtype" in r for r in part["rows"]) else []),
             "",
             "| method | prune s | score s | fit s | bare forward s | prune / forward | peak RSS | activations "
             "| training rows | training |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        ratio = r["prune_s"] / r["bare_forward_s"]
        stored = "stored" if r["activations_stored"] else "none"
        where = (r.get("activations") or {}).get("where", "disk") if r["activations_stored"] else ""
        lines.append(f"| {r['method']} | {r['prune_s']:.1f} | {r['score_s']:.1f} | {r['fit_s']:.1f} | "
                     f"{r['bare_forward_s']:.1f} | {ratio:.2f}x | {mib(r['peak_rss_bytes'])} | "
                     f"{stored}{f' ({where})' if where else ''} | {r.get('training_rows') or ''} | "
                     f"{r.get('training_precision') or ''} |")
        if r["method"] == "replaceme_ls":
            verdicts.append(("ReplaceMe-LS prune <= 1.2x a bare forward pass", f"{ratio:.2f}x", ratio <= 1.2))
    return lines


def render_sweep(part: dict, verdicts: list) -> list[str]:
    independent = sum(part["independent_s"].values())
    shared = sum(part["sweep_by_method_s"].values())
    # one ReplaceMe-LS run: the median of every LS run measured here (the one at ratio 0.25 and the three
    # independent cells), not a single timing on a noisy machine
    ls_runs = [part["single_ls_s"], *(v for k, v in part["independent_s"].items() if k.startswith("replaceme_ls@"))]
    single, mean = statistics.median(ls_runs), independent / len(part["independent_s"])
    lines = [f"## A 5-method x 3-ratio sweep ({part['samples']} x 256 tokens)", "", provenance(part), "",
             "| | prune s | / one ReplaceMe-LS run | / the mean independent run |", "|---|---|---|---|",
             f"| 15 independent runs (no shared cache) | {independent:.1f} | {independent / single:.1f}x | "
             f"{independent / mean:.1f}x |",
             f"| one sweep, shared statistics cache | {shared:.1f} | {shared / single:.2f}x | {shared / mean:.2f}x |",
             "",
             f"(One ReplaceMe-LS run: {single:.1f} s, the median of {len(ls_runs)} measured here "
             f"({', '.join(f'{v:.1f}' for v in ls_runs)}); the mean of the 15 independent runs: {mean:.1f} s; "
             f"the sweep's "
             f"whole wall time incl. model loads: {part['sweep_wall_s']:.0f} s.)", "",
             "The sweep's pruning seconds by method (3 ratios each; its first cell, ReplaceMe-LS at the first",
             "ratio, makes the one forward pass): "
             + ", ".join(f"{m} {v:.1f}" for m, v in part["sweep_by_method_s"].items()) + ".",
             f"Stored activations on disk after the sweep (kept here with cache.keep_activations=true): "
             f"{part['stored_bytes'] / 1e6:.0f} MB.", "",
             "Independent runs by cell (s): "
             + ", ".join(f"{k} {v:.1f}" for k, v in part["independent_s"].items()) + "."]
    verdicts.append(("15-cell sweep's pruning < 3x one run's (one ReplaceMe-LS run)", f"{shared / single:.2f}x",
                     shared / single < 3))
    return lines


def render_memory(part: dict, verdicts: list) -> list[str]:
    lines = ["## ReplaceMe-cosine peak RSS vs calibration size", "", provenance(part), "",
             "Both ways the fit can get its token rows, each at 1x, 2x and 4x the calibration set: replayed",
             f"from stored activations (budget raised to {STORE_BUDGET_GB} GiB so that every size is stored), "
             "and read by the",
             "fit's own forward pass (`cache.activations_gb=0`, what a model whose store exceeds the budget",
             "gets). cosine with 1 epoch: memory does not depend on the number of epochs. Both paths keep the",
             "store and the token rows in files, what a calibration set beyond `cache.activations_memory_gb` gets "
             "(the",
             "part sets it to 0; measurements dated before 2026-12-07 predate the setting and ran these paths "
             "anyway).",
             "Within that budget (the default) they stay in memory: memory then grows with the calibration set, up "
             "to the budget.", "",
             "| path | calibration | token rows | store on disk | peak RSS | vs 1x |", "|---|---|---|---|---|---|"]
    for path, rows in part["paths"].items():
        base = rows[0]["peak_rss_bytes"]
        for r in rows:
            lines.append(f"| {path} | {r['factor']}x ({r['n_samples']} x 256) | {r['n_tokens']} | "
                         f"{r['store_bytes'] / 1e9:.1f} GB | {mib(r['peak_rss_bytes'])} | "
                         f"{100 * (r['peak_rss_bytes'] / base - 1):+.1f}% |")
        growth = rows[-1]["peak_rss_bytes"] / base - 1
        verdicts.append((f"ReplaceMe-cosine peak RSS grows < 10% from 1x to 4x calibration ({path})",
                         f"{100 * growth:+.1f}%", growth < 0.10))
    return lines


RENDER = {"methods": render_methods, "sweep": render_sweep, "memory": render_memory}
# Parts measured by their own scripts (they store them in the same JSON): part -> module in benchmarks/.
OTHER_PARTS = {"eval_throughput": "eval_throughput"}
# Sections measured by their own scripts into their own records in docs/: record file -> module in benchmarks/
# (each has ``render_record(record, verdicts) -> lines``).
RECORD_SECTIONS = {"sleb_cost.json": "sleb_cost", "cold_single_run.json": "cold_single_run",
                   "parallel_sweep.json": "parallel_sweep", "real_scale.json": "real_scale",
                   "finercut_cost.json": "finercut_cost", "taylor_memory.json": "taylor_memory",
                   "layerwise_memory.json": "layerwise_memory", "strategy_decision.json": "strategy_decision",
                   "spill_reads.json": "spill_reads", "chunk_faults.json": "chunk_faults"}


def render(results: dict) -> str:
    import importlib

    verdicts: list = []
    sections = []
    for name in PARTS:
        if name in results:
            sections += ["", *RENDER[name](results[name], verdicts)]
    for name, module in OTHER_PARTS.items():
        if name in results:
            study = importlib.import_module(f"depthbench.benchmarks.{module}")
            sections += ["", *study.render_part(results[name], verdicts)]
    for file, module in RECORD_SECTIONS.items():
        record_path = ROOT / "docs" / file
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            study = importlib.import_module(f"depthbench.benchmarks.{module}")
            sections += ["", *study.render_record(record, verdicts)]
    head = ["# Performance", "",
            "Produced by `benchmarks/performance.py` (measurements in `docs/performance.json`; each part below",
            "says when, where and with which command it was measured). Model: SmolLM2-135M-Instruct,",
            "calibration: the default text of the part's commit, 256 tokens per sequence (BIG-bench Wikipedia",
            "articles up to commit 88297cb, the reading passages of docs/TEXT.md after it: the costs depend on the",
            "number of tokens, the same 128 x 256 for both, not on the text); `model.dtype=auto`, which resolves per",
            "machine: bfloat16 where the CPU has bfloat16 kernels (AVX512-BF16 / AMX), float32 elsewhere. Parts",
            "dated before 2026-11-30 ran bfloat16, those from then to 2026-12-07 float32 (a CPU without those",
            "kernels), and on 2026-12-08 the machine had them again: each part names the dtype it ran where its",
            "record holds it. The machine is shared: read the ratios, not the seconds.", "",
            "## Against the issues' targets", "", "| target | measured | met |", "|---|---|---|",
            *(f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in verdicts)]
    return "\n".join(head + sections) + "\n"


def environment(argv: list[str]) -> dict:
    import torch

    from depthbench.modeling.loading import cpu_has_bfloat16_kernels

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d"), "commit": f"{sha}{'+changes' if dirty else ''}" or "unknown",
            "machine": platform.machine(), "cpus": os.cpu_count(), "cpu_bfloat16_kernels": cpu_has_bfloat16_kernels(),
            "python": platform.python_version(), "torch": torch.__version__,
            "command": "python benchmarks/performance.py " + " ".join(shlex.quote(a) for a in argv)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--sweep-samples", type=int, default=32)
    parser.add_argument("--memory-samples", type=int, default=None, help="1x of the memory part (default: --samples)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    parser.add_argument("--results", default=str(ROOT / "docs" / "performance.json"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the Markdown from the JSON, measure nothing")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; allowed: {', '.join(PARTS)}")
    args.memory_samples = args.memory_samples or args.samples
    results_path, output = Path(args.results), Path(args.output)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not args.render_only:
        env = environment(sys.argv[1:])
        for name in parts:  # each part saved as soon as it is measured: an interrupted run keeps the others
            results[name] = {"environment": env, **MEASURE[name](args)}
            atomic.write_text(results_path, json.dumps(results, indent=1) + "\n")
            atomic.write_text(output, render(results))
    atomic.write_text(output, render(results))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

"""A 2-cell sweep run in parallel (two jobs sharing the sweep's cache) against the same sweep run
sequentially: calibration forward passes in total (counted across processes through
``DEPTHBENCH_COUNT_FORWARD_PASSES``, as tests/integration/test_parallel_sweeps.py counts them), wall
time of each and their ratio, and whether both give the same layers and perplexities.

The embedded GGUF is converted first (outside both timings). Each sweep gets a fresh sweep directory,
so each makes its own calibration pass; one run of each (the machine's other load makes timings
noisy: quote the ratio, with the machine).

    .venv/bin/python benchmarks/parallel_sweep.py [--launcher joblib|submitit_local] [--scale fast] \\
        [--output docs/parallel_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from depthbench.benchmarks._record import emit, machine_fields

ROOT = Path(__file__).resolve().parents[1]
CELLS = ["pruner=replaceme_ls", "ratio=0.1,0.2"]
QUIET = ["benchmark=none", "logger=none", "save_model=false", "efficiency.enabled=false",
         "evaluation.fidelity.enabled=false", "progress=false"]
LAUNCHERS = {"joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
             "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=120"]}


def sweep(directory: Path, scale: str, launcher: list[str]) -> dict:
    counter = directory.with_suffix(".passes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DEPTHBENCH_COUNT_FORWARD_PASSES": str(counter)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "depthbench.cli", "-m", *CELLS, f"scale={scale}", *QUIET, *launcher,
                           f"hydra.sweep.dir={directory}"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(p.read_text()) for p in directory.rglob("result.json")]
    return {"seconds": round(seconds, 1),
            "calibration_passes": len(counter.read_text().splitlines()) if counter.exists() else 0,
            "cells": {str(r["ratio"]): {"removed_layers": r["pruning"]["removed_layers"],
                                        "ppl": r["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]}
                      for r in records}}


def render_record(record: dict, verdicts: list) -> list[str]:
    """The parallel-sweep section of docs/PERFORMANCE.md (called by benchmarks/performance.py's render)."""
    seq, par = record["sequential"], record["parallel"]
    verdicts.append(("a 2-job parallel sweep makes one calibration pass in total, with the sequential results",
                     f"{par['calibration_passes']} pass(es), same results: {record['same_results']}",
                     par["calibration_passes"] == 1 and record["same_results"]))
    load = ", ".join(f"{x:.1f}" for x in record["load_average_at_end"])
    return [
        "## Parallel cells sharing one calibration pass (issue #18)", "",
        f"Measured {record['date']} on {record['cpus']} CPUs (load average at the end {load}) by "
        f"`.venv/bin/python benchmarks/parallel_sweep.py --output docs/parallel_sweep.json`: {record['what']}.", "",
        "| sweep | wall time | calibration passes | ratio: layers, held-out perplexity |", "|---|---|---|---|",
        *(f"| {name} | {r['seconds']:.1f} s | {r['calibration_passes']} | "
          + "; ".join(f"{ratio}: {' '.join(map(str, c['removed_layers']))}, {c['ppl']:.4g}"
                      for ratio, c in sorted(r["cells"].items())) + " |"
          for name, r in (("sequential (basic launcher)", seq), ("2 parallel jobs", par))), "",
        f"Parallel over sequential wall time: **{record['wall_time_ratio_parallel_over_sequential']:.2f}x**; "
        f"identical layers and perplexities: {record['same_results']}. The second job waits on the first one's "
        "calibration lock and then reads its statistics, so the pass is not duplicated. On one machine the jobs "
        "split its cores (joblib's loky workers get cpu_count // n_jobs threads each, here 1), so the one "
        "calibration pass, which every other cell waits for, runs on a share of the cores: where the pass "
        "dominates a cell, as at scale=fast on 2 cores, the parallel sweep is not faster than the sequential one. "
        "The launchers are for a cluster, where each job brings its own GPU or cores; on one small machine, run a "
        "sweep sequentially.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="joblib")
    parser.add_argument("--scale", default="fast", help="scale preset of both sweeps (default: fast)")
    parser.add_argument("--output", type=Path, help="also write the record here (JSON)")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from depthbench.modeling.loading import _plain_copy_of_gguf

    model = OmegaConf.load(ROOT / "conf" / "model" / "smollm2_135m.yaml")
    _plain_copy_of_gguf(model.gguf.package, model.gguf.file)  # converted once, before either timing
    with tempfile.TemporaryDirectory(prefix="depthbench-parallel-sweep-") as tmp:
        sequential = sweep(Path(tmp) / "sequential", args.scale, [])
        parallel = sweep(Path(tmp) / "parallel", args.scale, LAUNCHERS[args.launcher])
    record = {
        "what": f"2-cell sweep ({' '.join(CELLS)}, scale={args.scale}) sequential vs 2 parallel jobs "
                f"({args.launcher}) sharing the sweep cache",
        "sequential": sequential, "parallel": parallel,
        "wall_time_ratio_parallel_over_sequential": round(parallel["seconds"] / sequential["seconds"], 3),
        "same_results": sequential["cells"] == parallel["cells"],
        **machine_fields(),
    }
    emit(record, args.output)


if __name__ == "__main__":
    main()

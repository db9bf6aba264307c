"""Peak resident memory and time of reading training rows back from a spill file (`SpillArray`), one gather of
scattered rows at once against the gather in pieces that `SpillArray` does now.

    .venv/bin/python benchmarks/spill_reads.py [--reads 50] [--rows-factor 1] [--output docs/spill_reads.json]

ReplaceMe-cosine's training reads mini-batches of 1024 sorted random token rows from its spill files (rows on
disk: `cache.activations_memory_gb=0`, or rows beyond the budget). The performance table's memory part saw its
fit stage grow from 995 to 1161 MiB between 1x and 4x calibration; this script isolates the read. Each cell runs
in a fresh process that writes one spill file of ``rows x hidden`` float32 rows, resets the kernel's high-water
mark (``/proc/self/clear_refs``), makes ``--reads`` reads of 1024 scattered rows and reports the high-water mark's
growth (VmHWM) and the mean time per read:

- ``whole``: the former read: one numpy gather of all 1024 rows from the mapping, then the pages dropped
  (``madvise(MADV_DONTNEED)``). A page fault maps the cached pages around it too (fault-around / read-around),
  so one gather of scattered rows can map most of the file before the drop;
- ``pieces``: `SpillArray.__getitem__`: `SpillArray.ROWS_PER_DROP` rows per gather, the pages dropped after each.

Shapes: SmolLM2's width at the memory part's 4x calibration (256 x 256 tokens) and Llama-3-8B's width. The time
ratio pieces / whole is measured in one run (the machine is shared: read the ratio, not the milliseconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {"smollm2_4x": (65536, 576), "llama3_8b": (16384, 4096)}
MODES = ("whole", "pieces")
BATCH = 1024


def high_water_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM")


def child(mode: str, rows: int, hidden: int, reads: int, seed: int) -> dict:
    """One cell in this process: write the file, reset the high-water mark, read, report."""
    from depthbench.calibration.spill import SpillFile

    with tempfile.TemporaryDirectory(prefix="depthbench-spill-reads-") as tmp:
        spill = SpillFile(Path(tmp) / "rows.f32", (hidden,))
        block = np.random.default_rng(seed).standard_normal((4096, hidden)).astype(np.float32)
        for start in range(0, rows, len(block)):
            spill.append(block[:min(len(block), rows - start)])
        array = spill.open()
        rng = np.random.default_rng(seed + 1)
        batches = [np.sort(rng.choice(rows, min(BATCH, rows), replace=False)) for _ in range(reads)]
        first = np.array(array._array[batches[0]])  # the expected values, read before the measurement
        array._drop()
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark back to the current resident set
        before = high_water_kib()
        started = time.perf_counter()
        for index in batches:
            if mode == "whole":
                out = np.array(array._array[index])
                array._drop()
            else:
                out = array[index]
        seconds = time.perf_counter() - started
        growth = high_water_kib() - before
        if not np.array_equal(array[batches[0]], first):
            raise AssertionError("the two reads differ")
        del out
    return {"mode": mode, "rows": rows, "hidden": hidden, "file_mib": rows * hidden * 4 / 2**20,
            "peak_growth_mib": growth / 1024, "ms_per_read": 1e3 * seconds / reads}


def render_record(record: dict, verdicts: list) -> list[str]:
    """The section of docs/PERFORMANCE.md (called by benchmarks/performance.py's render)."""
    lines = [
        "## Reading spilled training rows: the peak of one read", "",
        f"Measured {record['date']} at commit {record['commit']} on {record['cpus']} CPUs by `{record['command']}` "
        "(the record: `docs/spill_reads.json`): each cell in a fresh process writes one spill file, then makes "
        f"{record['reads']} reads of {record['batch_rows']} sorted random rows, as ReplaceMe-cosine's training "
        "does with its rows on disk; `peak growth` is the kernel's high-water mark during the reads beyond the "
        "resident set before them (the rows read, the output arrays and whatever the mapping kept). `whole` "
        "gathers the 1024 rows at once, then drops the pages read (the code before 2026-12-08); `pieces` drops "
        f"them after every {record['rows_per_drop']} rows (`SpillArray` now).", "",
        "| shape | rows x hidden | file MiB | peak growth, whole | peak growth, pieces | ms per read, whole | "
        "ms per read, pieces | time pieces / whole |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(c["shape"], c["mode"]): c for c in record["cells"]}
    for shape, ratios in record["ratios"].items():
        whole, pieces = by[shape, "whole"], by[shape, "pieces"]
        lines.append(
            f"| {shape} | {whole['rows']} x {whole['hidden']} | {whole['file_mib']:.0f} | "
            f"{whole['peak_growth_mib']:.0f} MiB ({ratios['peak_growth_whole_over_file']:.2f}x the file) | "
            f"{pieces['peak_growth_mib']:.0f} MiB ({ratios['peak_growth_pieces_over_file']:.2f}x) | "
            f"{whole['ms_per_read']:.2f} | {pieces['ms_per_read']:.2f} | {ratios['time_pieces_over_whole']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reads", type=int, default=50, help="reads of 1024 rows per cell")
    parser.add_argument("--rows-factor", type=float, default=1.0,
                        help="scale every shape's rows (a quick check: 0.05); the record says which")
    parser.add_argument("--output", default=None, help="JSON record to write (default: print only)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "ROWS", "HIDDEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reads < 1:
        parser.error(f"--reads {args.reads}; allowed: a positive integer")
    if not 0 < args.rows_factor <= 1:
        parser.error(f"--rows-factor {args.rows_factor}; allowed: a number in (0, 1]")
    if args.child:
        mode, rows, hidden = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(child(mode, rows, hidden, args.reads, seed=0)))
        return

    from depthbench.benchmarks._record import emit, machine_fields
    from depthbench.calibration.spill import SpillArray
    from depthbench.provenance import git_sha

    cells = []
    for name, (rows, hidden) in SHAPES.items():
        rows = max(2, round(rows * args.rows_factor))
        for mode in MODES:
            proc = subprocess.run([sys.executable, __file__, "--reads", str(args.reads), "--child", mode, str(rows),
                                   str(hidden)], capture_output=True, text=True, check=True)
            cells.append({"shape": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
    by = {(c["shape"], c["mode"]): c for c in cells}
    ratios = {name: {**{f"peak_growth_{mode}_over_file": by[name, mode]["peak_growth_mib"] / by[name, mode]["file_mib"]
                        for mode in MODES},
                     "time_pieces_over_whole": by[name, "pieces"]["ms_per_read"] / by[name, "whole"]["ms_per_read"]}
              for name in SHAPES}
    emit({"benchmark": "spill_reads", "commit": git_sha() or "unknown", **machine_fields(),
          "command": " ".join(["python", "benchmarks/spill_reads.py", *sys.argv[1:]]),
          "rows_per_drop": SpillArray.ROWS_PER_DROP, "batch_rows": BATCH, "reads": args.reads,
          "rows_factor": args.rows_factor,
          "cells": cells, "ratios": ratios}, args.output)


if __name__ == "__main__":
    main()

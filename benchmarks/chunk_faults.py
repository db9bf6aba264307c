"""What the kernel's page faults cost the candidate-scoring methods on a CPU, before and after the allocator settings
and the small chunks (depthbench.allocator, depthbench.chunks).

    .venv/bin/python benchmarks/chunk_faults.py [--repeats 5] [--prune-ratio 0.05] [--skip-prune]
        [--output docs/chunk_faults.json]

Three configurations, each in fresh processes:

- ``before``: 64 MiB chunks and glibc's default thresholds: the divergence as before 2026-12-08 (its former
  ``CHUNK_ELEMENTS``); the NLL and the token statistics took whole batches, or 256 rows, at once before, so their
  former cost was at least this one's;
- ``chunks``: `depthbench.chunks.CPU_CHUNK_BYTES` (4 MiB), glibc's defaults;
- ``now``: 4 MiB chunks and `depthbench.allocator.keep_freed_memory`, what a run does.

Part ``kernels``: the scoring functions on SmolLM2-shaped random logits (2 x 256 positions, 49,152-token vocabulary,
bfloat16, some padding): FinerCut's ``js_ref`` divergence (`divergence_sum`), BlockPruner's / SLEB's / Shortened-PPL's
calibration NLL (`token_nll_sum`) and the fidelity evaluation's token statistics (`token_statistics`, float32
log-probs of 510 tokens): milliseconds per call, minor page faults per call and kernel (system) time per call,
means over ``--repeats`` calls after one warm-up call. Part ``prune``: FinerCut on SmolLM2 (the pipeline's own steps,
``scale=fast``, ``pruner.ratio`` from ``--prune-ratio``: a few greedy steps) timed in its prune stage, with its
faults and system time. Ratios to ``before`` are measured in one run (the machine is shared: read the ratios).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {"before": {"chunk_bytes": 64 << 20, "allocator": False},
           "chunks": {"chunk_bytes": None, "allocator": False},
           "now": {"chunk_bytes": None, "allocator": True}}
SHAPE = {"batch": 2, "positions": 256, "vocabulary": 49152}


def configure(name: str) -> None:
    """This process as configuration ``name`` (before any large allocation)."""
    from depthbench import allocator, chunks

    config = CONFIGS[name]
    if config["chunk_bytes"] is not None:
        chunks.CPU_CHUNK_BYTES = config["chunk_bytes"]
    if config["allocator"]:
        allocator.keep_freed_memory()


def measured(fn, repeats: int) -> dict:
    """Mean wall ms, minor faults and system ms per call of ``fn`` (after one warm-up call)."""
    fn()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        fn()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"ms": 1e3 * seconds / repeats, "faults": (after.ru_minflt - before.ru_minflt) / repeats,
            "system_ms": 1e3 * (after.ru_stime - before.ru_stime) / repeats}


def kernels(repeats: int, vocabulary: int) -> dict:
    import torch

    from depthbench.calibration.divergence import divergence_sum
    from depthbench.calibration.masked_nll import token_nll_sum
    from depthbench.evaluation.fidelity import token_statistics

    g = torch.Generator().manual_seed(0)
    b, t = SHAPE["batch"], SHAPE["positions"]
    dense = torch.randn(b, t, vocabulary, generator=g).to(torch.bfloat16)
    pruned = (dense.float() + 0.3 * torch.randn(b, t, vocabulary, generator=g)).to(torch.bfloat16)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 16:] = 0
    ids = torch.randint(0, vocabulary, (b, t), generator=g)
    pruned_lp = torch.log_softmax(pruned[:, :-1].float(), -1).reshape(-1, vocabulary)[: 2 * (t - 1)]
    dense_lp = torch.log_softmax(dense[:, :-1].float(), -1).reshape(-1, vocabulary)[: 2 * (t - 1)]
    values, top = dense_lp.topk(64, dim=-1)
    ref = {"topk_logprobs": values, "topk_ids": top.to(torch.int32),
           "tail_logmass": dense_lp.scatter(-1, top, float("-inf")).logsumexp(-1)}
    return {"js_ref_divergence": measured(lambda: divergence_sum(dense, pruned, mask, "js_ref"), repeats),
            "calibration_nll": measured(lambda: token_nll_sum(pruned, ids, mask), repeats),
            "fidelity_token_statistics": measured(lambda: token_statistics(pruned_lp, ref), repeats)}


def prune_cell(ratio: float) -> dict:
    """FinerCut on SmolLM2 through the pipeline's steps; its prune stage's seconds, faults and system time."""
    import tempfile
    from pathlib import Path

    from depthbench.benchmarks._config import compose
    from depthbench.experiments.pipeline import (RunContext, check_config, load_calibration_data, load_weights,
                                                 prune)

    cfg = compose("pruner=finercut", "scale=fast", f"ratio={ratio}", "cache.statistics=false", "progress=false")
    with tempfile.TemporaryDirectory(prefix="depthbench-chunk-faults-") as tmp:
        ctx = RunContext(cfg, Path(tmp))
        checked = check_config(ctx)
        inputs = load_calibration_data(ctx)
        loaded = load_weights(ctx, checked, inputs)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        outcome = prune(ctx, checked, inputs, loaded)
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    scores = outcome.result.selection.scores or {}
    return {"prune_s": seconds, "faults": after.ru_minflt - before.ru_minflt,
            "system_s": after.ru_stime - before.ru_stime,
            "removed": [str(u) for u in outcome.result.selection.units()], "evaluations": scores.get("evaluations"),
            "dtype": str(cfg.model.dtype)}


def render_record(record: dict, verdicts: list) -> list[str]:
    """The section of docs/PERFORMANCE.md (called by benchmarks/performance.py's render)."""
    results, ratios = record["results"], record["ratios"]
    shape = record["shape"]
    lines = [
        "## Page faults in candidate scoring: chunk size and the C allocator", "",
        f"Measured {record['date']} at commit {record['commit']} on {record['cpus']} CPUs by `{record['command']}` "
        "(the record: `docs/chunk_faults.json`), each configuration in fresh processes: `before` = 64 MiB chunks of "
        "temporaries and glibc's default malloc thresholds (the divergence's code before 2026-12-08; the NLL and "
        "the token statistics then took whole batches or 256 rows at once, at least as costly); `chunks` = 4 MiB "
        "chunks (`depthbench.chunks`), default thresholds; `now` = 4 MiB chunks and `depthbench.allocator` (mmap "
        "threshold 32 MiB, trim threshold 256 MiB), what a run does. Kernels on random logits of "
        f"{shape['batch']} x {shape['positions']} positions x {shape['vocabulary']:,} tokens (bfloat16), mean of "
        f"{record['repeats']} calls: ms per call / minor page faults per call / kernel time per call.", "",
        "| | before | chunks | now | before / now |", "|---|---|---|---|---|"]
    for kernel, ratio in ((k, ratios[f"{k}_before_over_now"]) for k in results["kernels"]["now"]):
        cells = [f"{c[kernel]['ms']:.0f} ms / {c[kernel]['faults']:,.0f} / {c[kernel]['system_ms']:.0f} ms"
                 for c in (results["kernels"][name] for name in CONFIGS)]
        lines.append(f"| {kernel} | {' | '.join(cells)} | **{ratio:.2f}x** |")
    if "prune" in results:
        prune = results["prune"]
        cells = [f"{prune[name]['prune_s']:.0f} s / {prune[name]['faults']:,} / {prune[name]['system_s']:.0f} s"
                 for name in CONFIGS]
        lines.append(f"| FinerCut prune on SmolLM2 ({prune['now']['dtype']}, `scale=fast ratio="
                     f"{record['prune_ratio']}`, {prune['now']['evaluations']} masked evaluations) | "
                     f"{' | '.join(cells)} | **{ratios['finercut_prune_before_over_now']:.2f}x** |")
        lines += ["", "Removed in every configuration: " + ", ".join(prune["now"]["removed"])
                  + (" (the same units)." if record["same_selection"] else " (NOT the same in every configuration).")]
        same = bool(record["same_selection"])
        verdicts.append(("the allocator settings and chunks change no selection (FinerCut, three configurations)",
                         "same units" if same else "different units", same))
    return lines


def child(args) -> dict:
    configure(args.child)
    if args.part == "kernels":
        return kernels(args.repeats, args.vocabulary)
    return prune_cell(args.prune_ratio)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kernel (after one warm-up)")
    parser.add_argument("--vocabulary", type=int, default=SHAPE["vocabulary"], help="vocabulary of the kernels' logits")
    parser.add_argument("--prune-ratio", type=float, default=0.05, help="FinerCut's ratio in the prune part")
    parser.add_argument("--skip-prune", action="store_true", help="the kernels part only")
    parser.add_argument("--output", default=None, help="JSON record to write (default: print only)")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["kernels", "prune"], default="kernels", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}; allowed: a positive integer")
    if not 0 < args.prune_ratio < 1:
        parser.error(f"--prune-ratio {args.prune_ratio}; allowed: a number in (0, 1)")
    if args.child:
        print(json.dumps(child(args)))
        return

    from depthbench.benchmarks._record import emit, machine_fields
    from depthbench.provenance import git_sha

    parts = ["kernels"] + ([] if args.skip_prune else ["prune"])
    results: dict = {part: {} for part in parts}
    for part in parts:
        for name in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--part", part, "--repeats",
                                   str(args.repeats), "--vocabulary", str(args.vocabulary), "--prune-ratio",
                                   str(args.prune_ratio)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"chunk_faults.py: the {part} cell of {name} failed:\n{proc.stderr[-3000:]}")
            results[part][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    ratios = {f"{kernel}_before_over_now": results["kernels"]["before"][kernel]["ms"]
              / results["kernels"]["now"][kernel]["ms"] for kernel in results["kernels"]["now"]}
    same_selection = None
    if "prune" in results:
        ratios["finercut_prune_before_over_now"] = results["prune"]["before"]["prune_s"] / \
            results["prune"]["now"]["prune_s"]
        # what was removed must not depend on how temporaries are allocated
        same_selection = len({json.dumps(r["removed"]) for r in results["prune"].values()}) == 1
    emit({"benchmark": "chunk_faults", "commit": git_sha() or "unknown", **machine_fields(),
          "command": " ".join(["python", "benchmarks/chunk_faults.py", *sys.argv[1:]]),
          "configs": CONFIGS, "shape": {**SHAPE, "vocabulary": args.vocabulary}, "repeats": args.repeats,
          "prune_ratio": None if args.skip_prune else args.prune_ratio, "same_selection": same_selection,
          "results": results, "ratios": ratios}, args.output)
    if same_selection is False:
        sys.exit("chunk_faults.py: FinerCut removed different units in different configurations (see the record)")


if __name__ == "__main__":
    main()

"""Shortened-Taylor's memory beyond the weights, before and after the float32 accumulator (issue 29).

    .venv/bin/python benchmarks/taylor_memory.py [--output docs/taylor_memory.json]

The GPU run of benchmarks/real_scale.py measured Shortened-Taylor at 95.2 GiB at Llama-3-8B's shape in
bfloat16 (a float64 ``S_W`` the size of the decoder, beside every gradient that `torch.autograd.grad`
returned at once). No GPU is needed to see what the change removes: each way of accumulating runs here, on
the CPU, on a small bfloat16 Llama whose decoder weights dwarf its activations, in a fresh process; its peak
resident memory beyond the loaded model (the kernel's high-water mark, reset just before the scores; glibc
is told to mmap every block over 64 KiB, so freed tensors leave the resident set) is set beside an
analytic count of the accumulator's, the gradients' and the fold's temporaries' bytes:

- ``before``: the function of commit ``BEFORE_COMMIT`` (read from git): a float64 buffer (8 bytes per
  decoder parameter), all gradients alive at once (the model's bytes per parameter), and the fold's float64
  copies of the largest weight, its gradient and their product (24 bytes per element of it);
- ``float64``: today's hooks with ``accumulator: float64``: the buffer, one weight's gradient at a time and
  the same three temporaries;
- ``float32``: today's default: a float32 buffer, one gradient and three float32 temporaries.

The same counts at Llama-3-8B's shape (its parameters counted on the meta device) give the 8B figures:
the bound ``95.2 GiB - (float64 buffer - float32 buffer)`` holds whatever the activations were, because the
hooks never keep more gradients alive than `torch.autograd.grad` did and the fold's temporaries shrink;
nothing here is measured on a GPU.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "db670e8"  # the last commit with autograd.grad and a float64 buffer
VARIANTS = ("before", "float64", "float32")
SMALL = dict(hidden=1024, layers=4, intermediate=4096, heads=16, kv_heads=4, vocab=2048)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def before_function():
    """``taylor_importance`` as it was at ``BEFORE_COMMIT`` (its source from git, executed alone)."""
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:pruners/shortened_llama.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    wanted = {"taylor_importance", "lm_labels"}
    body = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    from tqdm.auto import tqdm

    namespace = {"torch": torch, "tqdm": tqdm}
    exec(compile(ast.Module(body=body, type_ignores=[]), f"{BEFORE_COMMIT}:pruners/shortened_llama.py", "exec"),
         namespace)
    return namespace["taylor_importance"]


def decoder_weights(model) -> list[torch.Tensor]:
    from depthbench.modeling.adapters import adapter_for

    return [p for layer in adapter_for(model).decoder_layers() for name, p in layer.named_parameters()
            if name.endswith("weight")]


def analytic_bytes(variant: str, model) -> dict:
    """The accumulator's, the gradients' and the fold's temporaries' bytes at their peak (see the module
    docstring), and the weights' bytes."""
    weights = decoder_weights(model)
    count, largest = sum(p.numel() for p in weights), max(p.numel() for p in weights)
    model_bytes = weights[0].element_size()
    acc = 4 if variant == "float32" else 8
    gradients = count * model_bytes if variant == "before" else largest * model_bytes
    return {"accumulator": count * acc, "gradients": gradients, "temporaries": 3 * largest * acc,
            "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
            "decoder_parameters": count, "largest_weight": largest}


def child(variant: str, args) -> None:
    """One variant in this (fresh) process: prints its measured and analytic bytes as one JSON line."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_scale import build_model, random_calibration

    from depthbench.modeling.adapters import adapter_for
    from depthbench.pruners.methods.shortened_llama import taylor_importance

    torch.set_num_threads(1)
    model = build_model(SMALL, torch.bfloat16, "cpu", args.seed)
    data = random_calibration(args.samples, args.seq_len, 1, SMALL["vocab"], args.seed, "cpu")
    adapter = adapter_for(model)
    function = before_function() if variant == "before" else None
    with torch.no_grad():
        model(**data.batches[0], use_cache=False)  # warm-up: kernels and allocator state
    baseline = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    start = time.perf_counter()
    if function is not None:
        scores = function(adapter, data.batches, progress=False)
    else:
        scores = taylor_importance(adapter, data.batches, variant, progress=False)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    print(json.dumps({"variant": variant, "baseline_rss_bytes": baseline * 1024,
                      "peak_beyond_model_bytes": (peak - baseline) * 1024, "seconds": seconds, "scores": scores,
                      "analytic": analytic_bytes(variant, model)}))


def measure(variant: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--samples", str(args.samples),
                          "--seq-len", str(args.seq_len), "--seed", str(args.seed)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def old_gpu_peak(path: Path = ROOT / "docs" / "real_scale.json") -> dict:
    """The GPU peak of the float64 path: docs/real_scale.json's shortened_taylor row (run 1, an H200)."""
    record = json.loads(path.read_text())
    rows = [r for r in record["rows"] if r["method"] == "shortened_taylor" and r.get("peak_gpu_bytes")]
    if not rows:
        raise SystemExit(f"{path} has no shortened_taylor row with a GPU peak")
    run = record["runs"][rows[0]["run"]]
    return {"bytes": rows[0]["peak_gpu_bytes"], "device": run["device"], "commit": run.get("commit", "unknown"),
            "date": run["date"]}


def at_8b() -> dict:
    """The analytic counts at Llama-3-8B's shape in bfloat16 (parameters counted on the meta device)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_scale import SHAPES, build_model

    model = build_model(SHAPES["llama3_8b"], torch.bfloat16, "meta", 0)
    return {variant: analytic_bytes(variant, model) for variant in VARIANTS}


def render_record(record: dict, verdicts: list) -> list[str]:
    """The section of docs/PERFORMANCE.md (called by benchmarks/performance.py's render)."""
    gib = 2 ** 30
    rows, big = record["rows"], record["llama3_8b"]
    weights = rows[0]["analytic"]["weights"]

    def counted(a: dict) -> int:
        return a["accumulator"] + a["gradients"] + a["temporaries"]

    lines = [
        "## Shortened-Taylor's accumulator: memory beyond the weights (issue 29)", "",
        f"Measured {record['date']} at commit {record['commit']} on {record['cpus']} CPUs, torch {record['torch']}, "
        f"by `{record['command']}` (the record: `docs/taylor_memory.json`): a randomly initialised bfloat16 Llama "
        f"of shape {record['shape']} ({weights / 2**20:.0f} MiB of weights), {record['samples']} batches of 1 x "
        f"{record['seq_len']} tokens, each way of accumulating in a fresh process. `measured` is the peak resident "
        "memory beyond the loaded model while the scores are computed (the kernel's high-water mark; freed "
        "tensors leave the resident set); `counted` is the accumulator, the gradients alive at once and the "
        f"fold's temporaries, counted; `before` is the code of commit {record['before_commit']} "
        "(`torch.autograd.grad`, a float64 buffer).", "",
        "| accumulation | measured MiB | measured / weights | counted MiB | counted / weights | accumulator | "
        "gradients alive | max rel. score difference from before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["analytic"]
        lines.append(f"| {r['variant']} | {r['peak_beyond_model_bytes'] / 2**20:.0f} | "
                     f"{r['peak_beyond_model_bytes'] / weights:.2f}x | {counted(a) / 2**20:.0f} | "
                     f"{counted(a) / weights:.2f}x | {a['accumulator'] / 2**20:.0f} MiB | "
                     f"{a['gradients'] / 2**20:.0f} MiB | {r['max_rel_difference']:.1e} |")
    b, f32, old = big["before"], big["float32"], record["old_gpu_peak"]
    old_gib = old["bytes"] / gib
    bound = old_gib - (b["accumulator"] - f32["accumulator"]) / gib
    point = old_gib - (counted(b) - counted(f32)) / gib
    lines += [
        "", f"At Llama-3-8B's shape in bfloat16 ({b['weights'] / gib:.1f} GiB of weights, "
        f"{b['decoder_parameters'] / 1e9:.2f} G decoder parameters) the same counts give: before "
        f"{counted(b) / gib:.1f} GiB ({b['accumulator'] / gib:.1f} float64 buffer + {b['gradients'] / gib:.1f} "
        f"gradients + {b['temporaries'] / gib:.1f} temporaries), float64 with hooks "
        f"{counted(big['float64']) / gib:.1f} GiB, float32 (default) {counted(f32) / gib:.1f} GiB "
        f"({f32['accumulator'] / gib:.1f} + {f32['gradients'] / gib:.2f} + {f32['temporaries'] / gib:.2f}). The "
        f"GPU peak measured before, {old_gib:.1f} GiB ({old['device']}, {old['date']}, commit {old['commit']}, "
        "`benchmarks/real_scale.py`, docs/real_scale.json), therefore becomes "
        f"**at most {bound:.1f} GiB** with the float32 accumulator "
        f"(the buffer shrinks by {(b['accumulator'] - f32['accumulator']) / gib:.1f} GiB and nothing else can "
        f"grow: the hooks keep no more gradients alive than `torch.autograd.grad` did), and about {point:.1f} "
        "GiB if that peak came when every gradient was alive. **Not re-measured on a GPU** (none was available "
        "to this change): the next GPU session's `benchmarks/real_scale.py --methods shortened_taylor` replaces "
        f"the {old_gib:.1f} GiB row.",
    ]
    verdicts.append(("Shortened-Taylor at Llama-3-8B shape inside 80 GiB (float32 accumulator; bound derived from "
                     "the GPU measurement and CPU-checked counts, not re-measured)", f"<= {bound:.1f} GiB",
                     bound < 80))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4, help="calibration batches (1 sequence each)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON record to write (default: print only)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args.child, args)
        return
    from _record import emit

    from depthbench.provenance import git_sha

    rows = [measure(variant, args) for variant in VARIANTS]
    reference = rows[0]["scores"]
    for r in rows:
        r["max_rel_difference"] = max(abs(x - y) / abs(y) for x, y in zip(r["scores"], reference))
    record = {"date": time.strftime("%Y-%m-%d"), "commit": git_sha() or "unknown", "cpus": os.cpu_count(),
              "torch": torch.__version__, "before_commit": BEFORE_COMMIT, "shape": SMALL, "samples": args.samples,
              "seq_len": args.seq_len, "seed": args.seed, "old_gpu_peak": old_gpu_peak(),
              "command": " ".join([".venv/bin/python", "benchmarks/taylor_memory.py", *sys.argv[1:]]),
              "rows": rows, "llama3_8b": at_8b()}
    emit(record, args.output)
    print("\n".join(render_record(record, [])))


if __name__ == "__main__":
    main()

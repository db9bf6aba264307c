"""What ``cache.activation_strategy=auto`` decides on this machine for a model shape: the first two calibration
batches of a single ReplaceMe-LS run's score pass, measured as the pipeline measures them (the first batch's forward
time with its warm-up, the second's without; the first batch written to the store, flushed to the disk and read
back), and the decision with the numbers behind it. Only those batches run (the decision is made on the second)
and no store is kept, so this is cheap even where a whole pass is not. For comparison it also times what the
earlier rule priced: an unflushed write of `PROBE_BYTES` of activations (``page_cache_probe``: it lands in the
page cache, so it measures memory, not the disk a multi-GB store meets).

    .venv/bin/python benchmarks/strategy_decision.py [--shape smollm2_135m | llama3_8b] [--dtype float32]
        [--device cpu] [--samples 128 --seq-len 256 --batch-size 8] [--hidden H --layers L ...]
        [--output docs/strategy_decision.json]

Random weights and random token ids (timing needs no trained weights); the store is probed in a temporary
directory (``TMPDIR``, where a single run's store lives). Run it with the thread count of the runs it stands for
(torch's default: every core; the record states ``torch_threads``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from depthbench.benchmarks._record import emit, machine_fields
from depthbench.benchmarks.real_scale import SHAPES, build_model, random_calibration

ROOT = Path(__file__).resolve().parents[1]
#: SmolLM2-135M's config.json (the CPU default model of this project)
SMOLLM2_135M = dict(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152)


def first_batch_decision(shape: dict, dtype: torch.dtype, device: str, samples: int, seq_len: int,
                         batch_size: int) -> dict:
    from depthbench.calibration.activations import ActivationSlot
    from depthbench.calibration.statistics import LayerSimilarityTable, collect
    from depthbench.calibration.strategy import ActivationStrategy, DecidingWriter
    from depthbench.modeling.adapters import adapter_for

    model = build_model(shape, dtype, device, seed=0)
    adapter = adapter_for(model)
    data = random_calibration(samples, seq_len, batch_size, shape["vocab"], seed=0, device=device)
    strategy = ActivationStrategy("auto", fits=1)
    with tempfile.TemporaryDirectory(prefix="depthbench-strategy-") as tmp:
        decider = DecidingWriter(strategy, ActivationSlot(Path(tmp) / "store", 1 << 50), adapter, data.batches)
        score = [LayerSimilarityTable(adapter.num_layers, tokens) for tokens in ("last", "all")]  # LS's score pass
        with torch.no_grad():
            collect(adapter, data.batches[:2], [decider, *score], progress=False)
        decider.abort()
        probe = page_cache_probe(Path(tmp), shape["hidden"], dtype)
    record = strategy.record()
    for key in ("forward_passes", "replays"):  # two batches of one pass, not a run's counts
        record.pop(key)
    return {**record, "page_cache_probe": probe}


def page_cache_probe(directory: Path, hidden: int, dtype: torch.dtype) -> dict:
    """The earlier rule's write probe: `PROBE_BYTES` of activations written (host copy, CRC, ``write``) and not
    flushed; bytes, seconds and the rate it would have priced the store's writes at."""
    import time

    from depthbench.calibration.activations import append_bytes
    from depthbench.calibration.strategy import PROBE_BYTES

    x = torch.randn(8, 256, hidden).to(dtype)
    written, crc, started = 0, 0, time.perf_counter()
    with open(directory / "page-cache-probe.bin", "wb") as f:
        while written < PROBE_BYTES:
            crc, n = append_bytes(f, x, crc)
            written += n
    seconds = time.perf_counter() - started
    (directory / "page-cache-probe.bin").unlink()
    return {"bytes": written, "write_s": round(seconds, 4), "mb_per_s": round(written / seconds / 1e6, 1)}


def render_record(record: dict, verdicts: list) -> list[str]:
    """The decision's section of docs/PERFORMANCE.md (called by benchmarks/performance.py's render)."""
    decision = record["decision"]
    measured, estimate, probe = decision["measured"], decision["estimated_s"], decision["page_cache_probe"]
    flushed = measured["write_bytes"] / measured["write_s"] / 1e6
    share = measured["forward_batch_share"]
    load = ", ".join(f"{x:.1f}" for x in record["load_average_at_end"])
    return [
        "## The store-or-recompute decision (`cache.activation_strategy=auto`)", "",
        f"Measured {record['date']} on {record['cpus']} CPUs, {record['torch_threads']} torch threads (load average "
        f"at the end {load}) by `{record['command']}`: {record['what']}. What `auto` measures on the first two "
        "batches of the score pass, and what the earlier rule (first batch's forward, unflushed 64 MiB probe) would "
        "have priced instead (calibration/strategy.py):", "",
        "| quantity | value |", "|---|---|",
        f"| first batch's forward (with its warm-up) | {measured['cold_forward_s']:.2f} s |",
        f"| second batch's forward | {measured['second_forward_s']:.2f} s |",
        f"| forward priced (the cheaper per position) | {measured['forward_s']:.2f} s |",
        f"| forward pass over the calibration set, priced / from the first batch alone (the earlier rule) | "
        f"{estimate['forward_pass']:.1f} s / {measured['cold_forward_s'] / share:.1f} s |",
        f"| store write rate: first batch ({measured['write_bytes'] / 1e6:.0f} MB) flushed to the disk / "
        f"{probe['bytes'] / 1e6:.0f} MB unflushed (page cache) | {flushed:.0f} MB/s / {probe['mb_per_s']:.0f} MB/s |",
        f"| store write ({decision['store_bytes'] / 1e9:.2f} GB) + one replay | {estimate['store_write']:.1f} s + "
        f"{estimate['replay_per_fit']:.1f} s |",
        f"| store write at the unflushed rate (the earlier rule) | "
        f"{decision['store_bytes'] / 1e6 / probe['mb_per_s']:.1f} s |",
        f"| the fit's pass, priced at {decision['fit_layers']['priced']} of {decision['fit_layers']['of']} layers | "
        f"{estimate['fit_pass']:.1f} s |",
        f"| decision | **{decision['ran']}** |", "",
        "The machine is shared: a forward time measured while other jobs run is inflated, and so is the estimate.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2_135m", choices=["smollm2_135m", *sorted(SHAPES)])
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    for name in ("hidden", "layers", "intermediate", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{name}", type=int, help=f"override the shape's {name}")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    shape = dict(SMOLLM2_135M if args.shape == "smollm2_135m" else SHAPES[args.shape])
    for name in shape:
        override = getattr(args, name.replace("-", "_"))
        if override is not None:
            shape[name] = override
    decision = first_batch_decision(shape, getattr(torch, args.dtype), args.device, args.samples, args.seq_len,
                                    args.batch_size)
    emit({"what": f"cache.activation_strategy=auto on the first two batches of a single ReplaceMe-LS run, {args.shape} "
                  f"shape (random weights), {args.dtype} on {args.device}, {args.samples} x {args.seq_len} tokens in "
                  f"batches of {args.batch_size}",
          "command": " ".join(["python", "benchmarks/strategy_decision.py", *sys.argv[1:]]),
          "shape": shape, "torch_threads": torch.get_num_threads(), "decision": decision, **machine_fields()},
         args.output)


if __name__ == "__main__":
    main()

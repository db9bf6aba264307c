"""What ``cache.activation_strategy=auto`` decides on this machine for a model shape: the first calibration batch of
a single ReplaceMe-LS run's score pass, measured as the pipeline measures it (its forward time, the store's write
and read throughput probed on its activations), and the decision with the numbers behind it. Only the first
batch runs (the decision is made there) and no store is kept, so this is cheap even where a whole pass is not.

    .venv/bin/python benchmarks/strategy_decision.py [--shape smollm2_135m | llama3_8b] [--dtype float32]
        [--device cpu] [--samples 128 --seq-len 256 --batch-size 8] [--hidden H --layers L ...]
        [--output docs/strategy_decision.json]

Random weights and random token ids (timing needs no trained weights); the store is probed in a temporary
directory (``TMPDIR``, where a single run's store lives).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from _record import emit, machine_fields  # sibling modules (the script's folder is on sys.path)
from real_scale import SHAPES, build_model, random_calibration

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
        decider.start()
        with torch.no_grad():
            collect(adapter, data.batches[:1], [decider, *score], progress=False)
        decider.abort()
    record = strategy.record()
    for key in ("forward_passes", "replays"):  # one batch of one pass, not a run's counts
        record.pop(key)
    return record


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
    emit({"what": f"cache.activation_strategy=auto on the first batch of a single ReplaceMe-LS run, {args.shape} "
                  f"shape (random weights), {args.dtype} on {args.device}, {args.samples} x {args.seq_len} tokens in "
                  f"batches of {args.batch_size}",
          "command": " ".join(["python", "benchmarks/strategy_decision.py", *sys.argv[1:]]),
          "shape": shape, "torch_threads": torch.get_num_threads(), "decision": decision, **machine_fields()},
         args.output)


if __name__ == "__main__":
    main()

"""Forward-pass speed of the default model in float32 vs bfloat16 on this machine.

What ``model.dtype=auto`` (conf/model/smollm2_135m.yaml) weighs: it picks bfloat16 only where its arithmetic is
native (AVX512-BF16 / AMX CPUs, GPUs) and float32 elsewhere (an AVX2-only CPU); every record states its dtype.
Both dtypes are timed in one
process, interleaved, and the ratio is reported (absolute seconds on a shared machine are noisy).

    .venv/bin/python benchmarks/dtype_speed.py [--batch 8 --seq-len 256 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from depthbench.modeling.loading import load_model

    base = OmegaConf.load("conf/model/smollm2_135m.yaml")
    models = {}
    for dtype in ("float32", "bfloat16"):
        models[dtype] = load_model(OmegaConf.merge(base, {"dtype": dtype})).model
    ids = torch.randint(100, 40000, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {d: [] for d in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(input_ids=ids, use_cache=False)
        for _ in range(args.repeats):
            for dtype, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times[dtype].append(time.perf_counter() - start)
    med = {d: statistics.median(t) for d, t in times.items()}
    print(f"forward {args.batch} x {args.seq_len} tokens, median of {args.repeats} "
          f"(torch threads: {torch.get_num_threads()})")
    for dtype, seconds in med.items():
        print(f"  {dtype:9s} {seconds:.3f} s")
    print(f"  bfloat16 speed-up over float32: {med['float32'] / med['bfloat16']:.2f}x")


if __name__ == "__main__":
    main()

"""ReplaceMe-LS (and the other methods) at real scale on a randomly initialised model of Llama-3-8B's
shape: prune time against one bare forward pass over the same calibration data, set beside the 689 s
the ReplaceMe paper reports for LS (its Figure 1). Timing needs no trained weights, and the
calibration tokens are random ids, so this runs on a GPU machine without internet.

    .venv/bin/python benchmarks/real_scale.py [--methods replaceme_ls] [--samples 128 --seq-len 256]
        [--device cuda] [--dtype bfloat16] [--shape llama3_8b | --hidden H --layers L --intermediate I
        --heads A --kv-heads K --vocab V] [--activations-gb 32] [--output docs/real_scale.json]

Each method runs on a fresh copy of the weights (the same seed), in this process; CUDA timings are
synchronised. The stored-activations path needs (2L+1) x positions x hidden x 2 bytes of disk
(65 x 128 x 256 x 4096 x 2 B = 17 GB at Llama-3-8B shape): ``--activations-gb`` sets the budget
(0 = fits run their own partial forward pass). Writes one JSON record (atomically) with the
environment and every timing, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # Meta-Llama-3-8B's config.json
    "llama3_8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
}
PAPER_LS_SECONDS = 689  # ReplaceMe (arXiv 2505.02819), Figure 1, Llama-3-8B-Instruct, 25%


def build_model(shape: dict, dtype: torch.dtype, device: str, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_calibration(samples: int, seq_len: int, batch_size: int, vocab: int, seed: int, device: str):
    from depthbench.calibration.batches import CalibrationData

    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        ids = torch.randint(0, vocab, (n, seq_len), generator=g)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})
    return CalibrationData(batches, seq_len, description=f"{samples} x {seq_len} random token ids (seed {seed})")


def synchronised_seconds(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(method: str, pruner, shape: dict, dtype: torch.dtype, data, args) -> dict:
    """One method on a fresh model (same seed): a bare forward pass over the calibration data, then
    the whole prune (score, select, fit, apply), both timed in this process."""
    from depthbench.experiments.pipeline import layers_to_remove
    from depthbench.modeling.adapters import adapter_for

    model = build_model(shape, dtype, args.device, args.seed)

    def bare():
        with torch.no_grad():
            for batch in data.batches:
                model(**batch, use_cache=False)

    with torch.no_grad():
        model(**data.batches[0], use_cache=False)  # warm-up (kernels, allocator)
    bare_s = synchronised_seconds(bare, args.device)
    adapter = adapter_for(model)
    n_remove = layers_to_remove(args.ratio, adapter.num_layers)
    result = {}

    def prune():
        with pruner.service(adapter, data, activation_budget_bytes=int(args.activations_gb * 2**30)) as service:
            result["r"] = pruner.prune(adapter, service, n_remove)

    prune_s = synchronised_seconds(prune, args.device)
    return {"method": method, "layers_removed": n_remove, "prune_s": prune_s, "bare_forward_s": bare_s,
            "prune_over_forward": prune_s / bare_s,
            "stages_s": {k: round(v["seconds"], 2) for k, v in result["r"].stages.items()},
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="replaceme_ls")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shape", default="llama3_8b", choices=sorted(SHAPES))
    for name in ("hidden", "layers", "intermediate", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{name}", type=int, help=f"override the shape's {name}")
    parser.add_argument("--activations-gb", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON record to write (default: print only)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from depthbench.errors import ConfigError
    from depthbench.pruners import build_pruner

    try:  # built before any model: an unknown method fails here, naming the registered ones
        pruners = {m: build_pruner(m, {}) for m in args.methods.split(",") if m}
    except ConfigError as err:
        parser.error(str(err))
    shape = dict(SHAPES[args.shape])
    for name in shape:
        override = getattr(args, name.replace("-", "_"))
        if override is not None:
            shape[name] = override
    dtype = getattr(torch, args.dtype)
    data = random_calibration(args.samples, args.seq_len, args.batch_size, shape["vocab"], args.seed, args.device)

    rows = []
    for method, pruner in pruners.items():
        rows.append(measure(method, pruner, shape, dtype, data, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    env = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "device": (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                                                  else f"cpu ({torch.get_num_threads()} threads)"),
           "command": " ".join(["python", "benchmarks/real_scale.py", *sys.argv[1:]])}
    record = {"environment": env, "shape": shape, "dtype": args.dtype, "samples": args.samples,
              "seq_len": args.seq_len, "paper_ls_seconds": PAPER_LS_SECONDS, "rows": rows}
    print(f"\nShape {shape}, {args.dtype}, {args.samples} x {args.seq_len} tokens, {env['device']}\n")
    print("| method | prune s | bare forward s | prune / forward | paper LS s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['prune_s']:.1f} | {r['bare_forward_s']:.1f} | {r['prune_over_forward']:.2f}x | "
              f"{PAPER_LS_SECONDS if r['method'] == 'replaceme_ls' else ''} |")
    if args.output:
        from depthbench import atomic

        atomic.write_text(Path(args.output), json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""Reloading a pruned model that carries depthbench's linear modules (ReplaceMe on Gemma-2/3):
`depthbench.modeling.saving.load_pruned` against the straightforward way (build the architecture with its random
initialisation, read the whole state dict, ``load_state_dict``).

A randomly initialised Gemma-2 of the shape given (default: about 0.6B parameters, float32) is pruned
by inserting one linear module, saved with `save_pruned`, then loaded by each way in its own process
(so each peak is its own), alternating, ``--repeats`` times. Prints the median seconds and peak
anonymous memory of each (RssAnon sampled every 5 ms: the process's own allocations; plain peak RSS
would also count the page cache of the memory-mapped safetensors file, which both ways touch whole),
and their ratios; both loads are checked to give the same parameters.

    .venv/bin/python benchmarks/load_pruned.py [--hidden 1536 --layers 12 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_and_save(directory: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.saving import save_pruned
    from depthbench.modeling.surgery import ModelSurgery

    config = Gemma2Config(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), head_dim=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    transform = torch.eye(hidden) + 0.01 * torch.randn(hidden, hidden)
    ModelSurgery(adapter_for(model)).insert_mlp_output_linear(layers // 2, transform)
    save_pruned(model, None, directory, {"benchmark": "load_pruned"})


def straightforward_load(directory: Path):
    """Random initialisation of the whole architecture, then the whole state dict in memory at once."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.saving import CUSTOM_MODULES_FILE, WEIGHTS_DIR
    from depthbench.modeling.surgery import ModelSurgery

    custom = json.loads((directory / CUSTOM_MODULES_FILE).read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch.float32)
    adapter = adapter_for(model)
    for k in custom["mlp_output_linear_layers"]:
        ModelSurgery(adapter).insert_mlp_output_linear(int(k), torch.zeros(adapter.hidden_size, adapter.hidden_size))
    state = {}
    for f in sorted((directory / WEIGHTS_DIR).glob("*.safetensors")):
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def anonymous_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def one_load(way: str, directory: Path) -> None:
    """Child process: load one way, print seconds, peak anonymous memory and a checksum of the parameters."""
    import torch

    from depthbench.modeling.saving import load_pruned

    peak, done = [anonymous_rss()], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], anonymous_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model = load_pruned(directory) if way == "load_pruned" else straightforward_load(directory)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], anonymous_rss())
    with torch.no_grad():
        checksum = sum(float(p.double().sum()) for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_anon_bytes": peak[0],
                      "checksum": checksum, "parameters": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one_load(args.child[0], Path(args.child[1]))
        return
    ways = ("load_pruned", "straightforward")
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "pruned"
        build_and_save(directory, args.hidden, args.layers)
        for _ in range(args.repeats):
            for way in ways:
                out = subprocess.run([sys.executable, __file__, "--child", way, str(directory)], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout
                runs[way].append(json.loads(out.strip().splitlines()[-1]))
    if len({round(r["checksum"], 3) for w in ways for r in runs[w]}) != 1:
        raise SystemExit(f"the two loads gave different parameters: {runs}")
    median = {w: {k: statistics.median(r[k] for r in runs[w]) for k in ("seconds", "peak_anon_bytes")} for w in ways}
    print(f"Gemma-2 shape: hidden {args.hidden}, {args.layers} layers, {runs[ways[0]][0]['parameters'] / 1e6:.0f}M "
          f"parameters, float32; medians of {args.repeats} loads each, each in its own process")
    for w in ways:
        print(f"  {w:16s} {median[w]['seconds']:7.2f} s   "
              f"peak anonymous memory {median[w]['peak_anon_bytes'] / 2**20:8.0f} MiB")
    print(f"  load_pruned / straightforward: "
          f"time {median['load_pruned']['seconds'] / median['straightforward']['seconds']:.2f}x, "
          f"peak memory {median['load_pruned']['peak_anon_bytes'] / median['straightforward']['peak_anon_bytes']:.2f}x")


if __name__ == "__main__":
    main()

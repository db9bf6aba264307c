"""Peak memory of a layer-wise prune (``model.layerwise=true``) against the size of the checkpoint it prunes.

1. Writes a randomly initialised Llama-architecture model (default: 28 layers, hidden 2048, MLP 5632, vocabulary
   32,000, untied head: 6.3 GB in float32) as sharded safetensors WITHOUT materialising it: each tensor is
   generated (seeded normal, std 0.02; norms 1) when its turn comes and written at once
   (`depthbench.modeling.safetensors_io.write_sharded`), with a word-level tokenizer and a calibration text.
2. Prunes it with ReplaceMe-LS through the ``depthbench`` command in a subprocess (``model.layerwise=true
   evaluate=false``, 4 x 64 calibration tokens, ratio 0.25, ridge alpha 1e-3: 256 tokens are fewer than the hidden
   size, so the plain least-squares system is singular) and takes that subprocess's peak resident set size
   (its own ``VmHWM``, written at exit; a subprocess that imports the same modules and exits is measured the same
   way first, the fixed cost of the interpreter, torch and transformers).
3. Checks the pruned directory's config and index (layer count, every tensor present) and records peak RSS /
   checkpoint bytes, which must stay below 1/3 (issue 29). Deletes the checkpoint and the output unless --keep.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/layerwise_memory.py --output docs/layerwise_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import emit, machine_fields  # sibling module (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
#: The issue's bound: peak RSS of the layer-wise prune below this fraction of the checkpoint's size.
MAX_RSS_FRACTION = 1 / 3


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, dtype="float32")


def write_checkpoint(directory: Path, config, seed: int = 0) -> int:
    """The random model, tensor by tensor (names and shapes from a skeleton on the meta device); returns bytes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from depthbench.modeling.safetensors_io import TensorEntry, write_sharded

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)

    def produce(shape, is_norm: bool):
        if is_norm:
            return lambda: torch.ones(shape)
        return lambda: torch.randn(shape, generator=generator) * 0.02

    entries = [TensorEntry(name, torch.float32, tuple(p.shape), produce(tuple(p.shape), p.dim() == 1))
               for name, p in skeleton.state_dict().items()]
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    index = write_sharded(directory, entries, max_shard_bytes=1024**3)
    word_tokenizer(config.vocab_size).save_pretrained(directory)
    return int(index["metadata"]["total_size"])


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


#: Prepended to a subprocess's code: at exit it writes its own peak RSS (``VmHWM`` of /proc/self/status, the
#: high-water mark of its address space since exec) to the file named by DEPTHBENCH_PEAK_RSS_FILE.
REPORT_PEAK = ("import atexit, os\n"
               "def _peak():\n"
               "    kb = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
               "    open(os.environ['DEPTHBENCH_PEAK_RSS_FILE'], 'w').write(kb)\n"
               "atexit.register(_peak)\n")


def run_measured(code: str, args: list[str], peak_file: Path, env: dict | None = None) -> int:
    """Run ``python -c code args`` and return its own peak RSS in bytes. Not ``getrusage(RUSAGE_CHILDREN)``:
    Linux carries the parent's high-water mark into a child started by vfork + exec (Python's subprocess), so
    that figure is at least the benchmark process's own peak (it generated the checkpoint)."""
    environment = {**os.environ, **(env or {}), "DEPTHBENCH_PEAK_RSS_FILE": str(peak_file)}
    subprocess.run([sys.executable, "-c", REPORT_PEAK + code, *args], check=True, cwd=ROOT, env=environment)
    return int(peak_file.read_text()) * 1024


def import_baseline_rss(work: Path) -> int:
    """Peak RSS (bytes) of a subprocess that imports what the prune imports and exits."""
    code = ("import torch, transformers, hydra\nfrom transformers import AutoModelForCausalLM, LlamaForCausalLM\n"
            "import depthbench.cli, depthbench.experiments.pipeline, depthbench.calibration.layerwise\n")
    return run_measured(code, [], work / "peak-import")


def prune(checkpoint: Path, text: Path, run_dir: Path, n_samples: int, seq_len: int, ratio: float,
          alpha: float) -> tuple[float, int]:
    """The layer-wise ReplaceMe-LS run in a subprocess; returns its seconds and its peak RSS in bytes."""
    args = ["model=hf",
               f"model.name_or_path={checkpoint}", "model.layerwise=true", "model.dtype=float32", "device=cpu",
               "pruner=replaceme_ls", f"pruner.options.alpha={alpha}", f"ratio={ratio}", "evaluate=false",
               "logger=none", "benchmark=none",
               "calibration=local", f"calibration.path={text}", f"calibration.n_samples={n_samples}",
               f"calibration.seq_len={seq_len}", f"calibration.batch_size={n_samples}", "calibration.packing=true",
               "progress=false", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    peak = run_measured("from depthbench.cli import main\nmain()\n", args, run_dir.parent / "peak-prune",
                        {"DEPTHBENCH_CACHE": str(run_dir.parent / "cache")})
    return time.perf_counter() - started, peak


def check_output(directory: Path, layers_after: int) -> dict:
    """The pruned directory's layer count and tensors, from config.json and the shards' headers (no tensor read)."""
    from depthbench.modeling.safetensors_io import SafetensorsCheckpoint

    config = json.loads((directory / "config.json").read_text())
    saved = SafetensorsCheckpoint(directory)
    per_layer = {k for k in saved.keys() if k.startswith("model.layers.0.")}
    expected = {k.replace("model.layers.0.", f"model.layers.{i}.") for k in per_layer for i in range(layers_after)}
    missing = expected - set(saved.keys())
    if config["num_hidden_layers"] != layers_after or missing or any(
            k.startswith(f"model.layers.{layers_after}.") for k in saved.keys()):
        raise SystemExit(f"pruned model malformed: {config['num_hidden_layers']} layers, missing {sorted(missing)[:3]}")
    shards = sorted({f for f in saved.weight_map.values()})
    return {"num_hidden_layers": config["num_hidden_layers"], "tensors": len(saved.keys()), "shards": len(shards),
            "bytes": sum((directory / f).stat().st_size for f in shards)}


def render_record(record: dict, verdicts: list) -> list[str]:
    """The layer-wise section of docs/PERFORMANCE.md (called by benchmarks/performance.py's render)."""
    from depthbench.pruners import pruner_registry

    gb = 1e9
    fraction = record["peak_rss_fraction_of_checkpoint"]
    others = [name for name in pruner_registry.names()
              if pruner_registry.get(name).supports_layerwise and name != "replaceme_ls"]
    verdicts.append(("a ~6 GB float32 Llama pruned by ReplaceMe-LS with model.layerwise=true at peak RSS < 1/3 of "
                     "its checkpoint", f"{fraction:.3f} of {record['checkpoint_bytes'] / gb:.2f} GB",
                     record["within_bound"]))
    m, load = record["model"], ", ".join(f"{x:.1f}" for x in record["load_average_at_end"])
    stages = record["stages"]
    stage_text = ", ".join(f"{name} {stages[name]['seconds']:.1f} s" for name in
                           ("load", "prune.score", "prune.fit", "prune.apply", "save") if name in stages)
    return [
        "## A model larger than memory, pruned layer by layer (issue #29)", "",
        f"Measured {record['date']} on {record['cpus']} CPUs (load average at the end {load}) by "
        f"`{record['command']}`: a randomly initialised Llama-architecture model ({m['layers']} layers, hidden "
        f"{m['hidden']}, MLP {m['intermediate']}, vocabulary {m['vocab']}, untied head, float32) written tensor by "
        f"tensor as {record['checkpoint_shards']} safetensors shards, pruned by ReplaceMe-LS (ridge alpha "
        f"{record['alpha']:g}) at ratio {record['ratio']} with `model.layerwise=true evaluate=false` on "
        f"{record['calibration']['n_samples']} x "
        f"{record['calibration']['seq_len']} calibration tokens, in a subprocess whose peak RSS is "
        "its own `VmHWM` (/proc/self/status) at exit.", "",
        "| checkpoint | peak RSS of the prune | peak RSS / checkpoint | importing the modules alone | prune (whole "
        "process) | removed layers |",
        "|---|---|---|---|---|---|",
        f"| {record['checkpoint_bytes'] / gb:.2f} GB | {record['peak_rss_bytes'] / gb:.2f} GB | **{fraction:.3f}** "
        f"| {record['import_only_peak_rss_bytes'] / gb:.2f} GB | {record['prune_seconds']:.1f} s | "
        f"{' '.join(map(str, record['removed_layers']))} |", "",
        f"Stages: {stage_text}. The pruned directory ({record['pruned_model']['num_hidden_layers']} layers, "
        f"{record['pruned_model']['bytes'] / gb:.2f} GB in {record['pruned_model']['shards']} shards) was checked "
        "from its config and shard headers. What stays in memory: the interpreter with torch and transformers (the "
        "import-only column), the input embedding, one decoder layer, the carried calibration activations and "
        "ReplaceMe-LS's float64 moments (2 x hidden^2); the score pass reads every layer once and the moments pass "
        "the layers up to the block's end again, and the save copies each kept tensor from the input shards.", "",
        f"Only ReplaceMe-LS was measured here. The other layer-wise methods ({', '.join(others)}; some only with "
        "certain options, docs/USAGE.md) hold more captured activations between layers (up to 2L + 1 times the "
        "carried state for LLM-Drop: the per-method list is in `calibration/layerwise.py`'s docstring; beyond "
        "`model.layerwise_buffer_gb` they go to disk) and, for the trained ones, the layers they train or change; "
        "their peak RSS has not been measured.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=1e-3,
                        help="ReplaceMe-LS ridge: 4 x 64 tokens are fewer than the hidden size, so A alone is singular")
    parser.add_argument("--work-dir", default=None, help="where the checkpoint is written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the pruned model")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="depthbench-layerwise-", dir=args.work_dir))
    try:
        config = llama_config(args.layers, args.hidden, args.intermediate, args.vocab, args.heads)
        started = time.perf_counter()
        checkpoint_bytes = write_checkpoint(work / "checkpoint", config)
        write_seconds = time.perf_counter() - started
        text = work / "calibration.txt"
        text.write_text(" ".join(f"w{4 + (i * 7919) % (args.vocab - 4)}" for i in range(args.n_samples * args.seq_len
                                                                                        * 4)) + "\n")
        baseline = import_baseline_rss(work)
        seconds, peak = prune(work / "checkpoint", text, work / "run", args.n_samples, args.seq_len, args.ratio,
                              args.alpha)
        result = json.loads((work / "run" / "result.json").read_text())
        output = check_output(work / "run" / "pruned_model", result["pruning"]["num_layers_after"])
        record = {
            "benchmark": "layerwise_memory",
            "command": "OMP_NUM_THREADS=2 .venv/bin/python benchmarks/layerwise_memory.py --output "
                       "docs/layerwise_memory.json",
            "model": {"architecture": "llama (random, float32)", "layers": args.layers, "hidden": args.hidden,
                      "intermediate": args.intermediate, "vocab": args.vocab, "heads": args.heads,
                      "tied_head": False},
            "checkpoint_bytes": checkpoint_bytes,
            "checkpoint_shards": len(list((work / "checkpoint").glob("*.safetensors"))),
            "checkpoint_write_seconds": round(write_seconds, 1),
            "method": "replaceme_ls", "alpha": args.alpha, "ratio": args.ratio,
            "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len,
                            "n_tokens": result["calibration"]["n_tokens"]},
            "removed_layers": result["pruning"]["removed_layers"],
            "prune_seconds": round(seconds, 1),
            "stages": {k: v for k, v in result["stages"].items() if isinstance(v, dict) or isinstance(v, float)},
            "peak_rss_bytes": peak,
            "import_only_peak_rss_bytes": baseline,
            "peak_rss_fraction_of_checkpoint": peak / checkpoint_bytes,
            "bound": MAX_RSS_FRACTION,
            "within_bound": peak / checkpoint_bytes < MAX_RSS_FRACTION,
            "pruned_model": output,
            **machine_fields(),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit(record, args.output)
    if not record["within_bound"]:
        raise SystemExit(f"peak RSS {peak / 1e9:.2f} GB is not below 1/3 of the checkpoint "
                         f"({checkpoint_bytes / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()

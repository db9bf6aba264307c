"""Peak memory of a layer-wise prune (``model.layerwise=true``) against the size of the checkpoint it prunes.

1. Writes a randomly initialised Llama-architecture model (default: 28 layers, hidden 2048, MLP 5632, vocabulary
   32,000, untied head: 6.3 GB in float32) as sharded safetensors WITHOUT materialising it: each tensor is
   generated (seeded normal, std 0.02; norms 1) when its turn comes and written at once
   (`depthbench.modeling.safetensors_io.write_sharded`), with a word-level tokenizer and a calibration text.
2. Prunes it with each method of ``--methods`` (default: every method that runs layer-wise, ReplaceMe-LS first)
   through the ``depthbench`` command in a subprocess of its own (``model.layerwise=true evaluate=false``, 4 x 64
   calibration tokens, ratio 0.25, the options a layer-wise run needs: `LAYERWISE_OPTIONS`; ReplaceMe-LS with
   ridge alpha 1e-3, since 256 tokens are fewer than the hidden size and the plain least-squares system is
   singular) and takes that subprocess's peak resident set size (its own ``VmHWM``, written at exit; a
   subprocess that imports the same modules and exits is measured the same way first, the fixed cost of the
   interpreter, torch and transformers).
3. Checks each pruned directory's config and index (layer count, every tensor present) and records peak RSS /
   checkpoint bytes, which must stay below 1/3 (issue 29: ReplaceMe-LS; the others are held to the same bound).
   Deletes the checkpoint and the outputs unless --keep.

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
#: What each method needs to run layer-wise beyond its defaults (the others are refused before any weights are
#: read: `Pruner.check_layerwise_options`), and ReplaceMe-LS's ridge for fewer tokens than hidden dimensions.
LAYERWISE_OPTIONS = {"replaceme_ls": {"alpha": "{alpha}"}, "linearpatch": {"placement": "mlp_fold"},
                     "llm_streamline": {"loss": "mse"}}


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


def method_options(method: str, alpha: float) -> dict[str, str]:
    return {k: v.format(alpha=alpha) for k, v in LAYERWISE_OPTIONS.get(method, {}).items()}


def prune(checkpoint: Path, text: Path, run_dir: Path, n_samples: int, seq_len: int, ratio: float,
          method: str, options: dict[str, str]) -> tuple[float, int]:
    """One layer-wise run of ``method`` in a subprocess; returns its seconds and its peak RSS in bytes."""
    args = ["model=hf",
               f"model.name_or_path={checkpoint}", "model.layerwise=true", "model.dtype=float32", "device=cpu",
               f"pruner={method}", *(f"pruner.options.{k}={v}" for k, v in options.items()), f"ratio={ratio}",
               "evaluate=false", "logger=none", "benchmark=none",
               "calibration=local", f"calibration.path={text}", f"calibration.n_samples={n_samples}",
               f"calibration.seq_len={seq_len}", f"calibration.batch_size={n_samples}", "calibration.packing=true",
               "progress=false", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    peak = run_measured("from depthbench.cli import main\nmain()\n", args, run_dir.parent / f"peak-{method}",
                        {"DEPTHBENCH_CACHE": str(run_dir.parent / f"cache-{method}")})
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
    rows = record["methods"]
    checkpoint = record["checkpoint_bytes"]
    ls = rows.get("replaceme_ls")
    if ls is not None:
        verdicts.append(("a ~6 GB float32 Llama pruned by ReplaceMe-LS with model.layerwise=true at peak RSS < 1/3 "
                         "of its checkpoint", f"{ls['peak_rss_fraction_of_checkpoint']:.3f} of "
                         f"{checkpoint / gb:.2f} GB", ls["within_bound"]))
    others = {m: r for m, r in rows.items() if m != "replaceme_ls"}
    if others:
        worst = max(others, key=lambda m: others[m]["peak_rss_fraction_of_checkpoint"])
        verdicts.append(("the other layer-wise methods on the same checkpoint, each at peak RSS < 1/3 of it",
                         f"largest {worst} {others[worst]['peak_rss_fraction_of_checkpoint']:.3f}",
                         all(r["within_bound"] for r in others.values())))
    m, load = record["model"], ", ".join(f"{x:.1f}" for x in record["load_average_at_end"])
    table = ["| method (options) | peak RSS of the prune | peak RSS / checkpoint | prune (whole process) | "
             "load, score, fit, apply, save s | removed | pruned model |", "|---|---|---|---|---|---|---|"]
    for method, r in rows.items():
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        stages = " / ".join(f"{r['stages'][name]['seconds']:.1f}" if name in r["stages"] else "-"
                            for name in ("load", "prune.score", "prune.fit", "prune.apply", "save"))
        removed = " ".join(map(str, r["removed_layers"] or r["removed_sub_blocks"]))
        table.append(f"| {method}{f' ({options})' if options else ''} | {r['peak_rss_bytes'] / gb:.2f} GB | "
                     f"**{r['peak_rss_fraction_of_checkpoint']:.3f}** | {r['prune_seconds']:.1f} s | {stages} | "
                     f"{removed} | {r['pruned_model']['num_hidden_layers']} layers, "
                     f"{r['pruned_model']['bytes'] / gb:.2f} GB |")
    missing = [name for name in pruner_registry.names()
               if pruner_registry.get(name).supports_layerwise and name not in rows]
    return [
        "## A model larger than memory, pruned layer by layer (issue #29)", "",
        f"Measured {record['date']} on {record['cpus']} CPUs (load average at the end {load}) by "
        f"`{record['command']}`: a randomly initialised Llama-architecture model ({m['layers']} layers, hidden "
        f"{m['hidden']}, MLP {m['intermediate']}, vocabulary {m['vocab']}, untied head, float32, "
        f"{checkpoint / gb:.2f} GB) written tensor by tensor as {record['checkpoint_shards']} safetensors shards, "
        f"pruned by each method at ratio {record['ratio']} with `model.layerwise=true evaluate=false` on "
        f"{record['calibration']['n_samples']} x {record['calibration']['seq_len']} calibration tokens, each run in "
        "a subprocess whose peak RSS is its own `VmHWM` (/proc/self/status) at exit. Importing the modules alone "
        f"peaks at {record['import_only_peak_rss_bytes'] / gb:.2f} GB.", "",
        *table, "",
        "Each pruned directory was checked from its config and shard headers (layer count, every tensor present; "
        "removed attention or MLP sub-blocks, `K.attn` / `K.mlp`, are saved as zeros by default, so the directory "
        "keeps every layer: modeling/saving.py). "
        "What stays in memory: the interpreter with torch and transformers, the input embedding, one decoder layer, "
        "the carried calibration activations and what each method holds between layers (captured activations: "
        "`calibration/layerwise.py`'s docstring lists them per method; beyond `model.layerwise_buffer_gb` they go "
        "to disk; ReplaceMe-LS's float64 moments, 2 x hidden^2; ReplaceMe-cosine's and LLM-Streamline's training "
        "rows, in files; the layers a method trains or changes); the score pass reads every layer once, a fit's "
        "pass the layers up to its block's end again, and the save copies each kept tensor from the input shards. "
        "With 256 calibration tokens the captured activations are small: at a real calibration volume they grow "
        "with the tokens up to the buffer.",
        *(["", f"Not measured here: {', '.join(missing)}."] if missing else []),
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
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods that run layer-wise (default: all of them, replaceme_ls first)")
    parser.add_argument("--work-dir", default=None, help="where the checkpoint is written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the pruned model")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    from depthbench.pruners import pruner_registry

    layerwise = [n for n in pruner_registry.names() if pruner_registry.get(n).supports_layerwise]
    methods = (sorted(layerwise, key=lambda n: n != "replaceme_ls") if args.methods is None
               else [m for m in args.methods.split(",") if m])
    unknown = [m for m in methods if m not in layerwise]
    if unknown:
        parser.error(f"--methods {','.join(unknown)}: not a method that runs layer-wise; allowed: "
                     f"{', '.join(layerwise)}")

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
        rows, tokens = {}, None
        for method in methods:
            options = method_options(method, args.alpha)
            run_dir = work / f"run-{method}"
            seconds, peak = prune(work / "checkpoint", text, run_dir, args.n_samples, args.seq_len, args.ratio,
                                  method, options)
            result = json.loads((run_dir / "result.json").read_text())
            tokens = result["calibration"]["n_tokens"]
            rows[method] = {
                "options": options,
                "removed_layers": result["pruning"]["removed_layers"],
                "removed_sub_blocks": result["pruning"]["removed_sub_blocks"],
                "prune_seconds": round(seconds, 1),
                "stages": {k: v for k, v in result["stages"].items() if isinstance(v, (dict, float))},
                "peak_rss_bytes": peak,
                "peak_rss_fraction_of_checkpoint": peak / checkpoint_bytes,
                "within_bound": peak / checkpoint_bytes < MAX_RSS_FRACTION,
                "pruned_model": check_output(run_dir / "pruned_model", result["pruning"]["num_layers_after"]),
            }
            print(method, json.dumps({k: v for k, v in rows[method].items() if k != "stages"}), flush=True)
            if not args.keep:
                shutil.rmtree(run_dir / "pruned_model", ignore_errors=True)
        record = {
            "benchmark": "layerwise_memory",
            "command": "OMP_NUM_THREADS=2 .venv/bin/python benchmarks/layerwise_memory.py --output "
                       "docs/layerwise_memory.json" + (f" --methods {args.methods}" if args.methods else ""),
            "model": {"architecture": "llama (random, float32)", "layers": args.layers, "hidden": args.hidden,
                      "intermediate": args.intermediate, "vocab": args.vocab, "heads": args.heads,
                      "tied_head": False},
            "checkpoint_bytes": checkpoint_bytes,
            "checkpoint_shards": len(list((work / "checkpoint").glob("*.safetensors"))),
            "checkpoint_write_seconds": round(write_seconds, 1),
            "ratio": args.ratio,
            "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "n_tokens": tokens},
            "import_only_peak_rss_bytes": baseline,
            "bound": MAX_RSS_FRACTION,
            "methods": rows,
            **machine_fields(),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit(record, args.output)
    over = [m for m, r in rows.items() if not r["within_bound"]]
    if over:
        raise SystemExit(f"peak RSS not below 1/3 of the checkpoint ({checkpoint_bytes / 1e9:.2f} GB): "
                         + ", ".join(f"{m} {rows[m]['peak_rss_bytes'] / 1e9:.2f} GB" for m in over))


if __name__ == "__main__":
    main()

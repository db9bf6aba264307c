"""Same runs before and after a refactor: every method's chosen layers, replacement and perplexity.

    python benchmarks/method_results.py --output docs/method_results.json          # record
    python benchmarks/method_results.py --compare docs/method_results.json         # rerun and compare
    python benchmarks/method_results.py --tiny --output docs/method_results_tiny.json   # every method, minutes
    python benchmarks/method_results.py --compare docs/method_results_tiny.json

``--tiny`` runs EVERY registered built-in method (the registry, not a hand-kept list) on a tiny random Llama
with SmolLM2's tokenizer (16 layers, hidden 32, seeded; the ratio-sweep test's model) at ``scale=fast`` with
2 x 32 calibration tokens (MKA: 56 sequences, it needs more than 50), in float32, and also keeps every removed
sub-block and the KL to the dense model: a before/after check for refactors that takes minutes, not hours.

Each method prunes SmolLM2 (the embedded default, in its ``model.dtype``: ``auto`` is float32 on a CPU without
native bfloat16; the committed records pin float32 by ``extra_overrides``) at 25% with the same calibration data and
is evaluated on the same held-out windows (no lm-eval tasks, no speed: only what the method decides).
A record keeps, per method, the removed layers, the held-out perplexity of the pruned model and the
replacement's own diagnostics (fit residuals, training objectives). ``--compare`` reruns the same
cells with the checked-out code and exits 1 when a layer set differs or a number moves by more than
``--rtol``; the record names the commit it was measured at.

The "before" side must run the OLD code as a whole: install that commit beside the checkout and run this
script with the installed copy first on the path::

    git worktree add /tmp/base <commit>
    (cd /tmp/base && pip install --no-deps --no-build-isolation --target /tmp/base-site .)
    PYTHONPATH=/tmp/base-site python benchmarks/method_results.py --output old.json --commit <commit>

The config is composed from the config tree of the depthbench that is imported. Putting an older checkout's
folder on ``sys.path`` instead is refused (`code_root`): its ``depthbench/`` would be imported, but the
editable install's finder serves ``depthbench.pruners``, ``depthbench.experiments``, ... from THIS checkout,
so "old" cells would run the new methods with the old YAML defaults (the first record of this script, labelled
f85af1b, was made that way and compared the new code with itself).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

METHODS = ["uidl", "shortgpt", "replaceme_ls", "replaceme_cosine", "llm_streamline"]
DIAGNOSTICS = ("relative_residual", "relative_residual_without_transform", "objective_at_identity",
               "objective_after", "mse_before_training", "mse_after_training")


def _numbers(replacement) -> dict:
    """The replacement's numeric diagnostics, flattened (block by block)."""
    out: dict = {}
    if not replacement:
        return out
    for key in DIAGNOSTICS:
        if isinstance(replacement.get(key), (int, float)):
            out[key] = replacement[key]
    for i, block in enumerate(replacement.get("blocks") or []):
        for key in DIAGNOSTICS:
            if isinstance(block.get(key), (int, float)):
                out[f"block{i}.{key}"] = block[key]
    return out


def code_root() -> Path:
    """The one code tree the measured depthbench comes from (a checkout with an editable install, or an
    installed copy); raises SystemExit when ``depthbench`` and ``depthbench.pruners`` come from two trees."""
    import depthbench
    import depthbench.pruners

    root = Path(depthbench.__file__).resolve().parent.parent
    pruners = Path(depthbench.pruners.__file__).resolve().parent
    if not pruners.is_relative_to(root):
        raise SystemExit(f"depthbench is imported from {root} but depthbench.pruners from {pruners}: two code trees "
                         f"mixed (an older checkout on sys.path over an editable install?); install the old commit "
                         f"with pip --target and run with PYTHONPATH=<that directory>")
    return root


def compose(*overrides: str):
    """The run config from the config tree of the imported depthbench (never from this checkout's files)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    import depthbench.conf

    root = code_root()
    try:  # the options' schema: absent in older commits (the editable finder may then serve this checkout's)
        from depthbench import config_store
    except ImportError:
        config_store = None
    if config_store is not None and Path(config_store.__file__).resolve().is_relative_to(root):
        config_store.register_configs()
    with initialize_config_dir(config_dir=str(Path(depthbench.conf.__file__).resolve().parent), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


#: Tiny mode: the model (the ratio-sweep test's: 16 layers so that Shortened LLaMA's protected layers leave room,
#: hidden 32, a power of two for LinearPatch's rotation) and the overrides every cell shares.
TINY_LAYERS, TINY_HIDDEN, TINY_SEED = 16, 32, 0
TINY_OVERRIDES = ("scale=fast", "calibration.seq_len=32", "calibration.batch_size=2", "model.dtype=float32")
#: Methods that need more calibration sequences than the tiny default (MKA's k-NN entropy: more than 50).
TINY_METHOD_OVERRIDES = {"mka": ("calibration.n_samples=56",)}


def builtin_methods() -> list[str]:
    """Every registered pruner that ships with depthbench (plugins excluded), from the registry."""
    from depthbench.pruners import pruner_registry

    return sorted(n for n in pruner_registry.names() if pruner_registry.get(n).__module__.startswith("depthbench."))


def write_tiny_model(directory: Path) -> Path:
    """A seeded tiny Llama with SmolLM2's tokenizer, saved with save_pretrained (no download: the embedded
    default's tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from depthbench.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(compose().model)
    config = LlamaConfig(num_hidden_layers=TINY_LAYERS, hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def measure(methods: list[str], samples: int, windows: int, extra: dict[str, list[str]] | None = None,
            commit: str | None = None, tiny: bool = False) -> dict:
    root_of_code = code_root()
    from depthbench.experiments.pipeline import run
    from depthbench.provenance import provenance

    root = Path(tempfile.mkdtemp(prefix="depthbench-method-results-"))
    cells = {}
    try:
        shared: tuple[str, ...] = ()
        if tiny:
            shared = ("model=hf", f"model.name_or_path={write_tiny_model(root / 'tiny-model')}", *TINY_OVERRIDES)
        for method in methods:
            cfg = compose(f"pruner={method}", "ratio=0.25", *shared, f"calibration.n_samples={samples}",
                          f"evaluation.perplexity.max_windows={windows}", "benchmark=none", "efficiency.enabled=false",
                          "logger=none", "progress=false", "save_model=false", f"cache.dir={root / 'cache'}",
                          "cache.base_results=false", *(TINY_METHOD_OVERRIDES.get(method, ()) if tiny else ()),
                          *(extra or {}).get(method, []))
            record = run(cfg, root / method)
            cells[method] = {
                "removed_layers": record["pruning"]["removed_layers"],
                "perplexity": record["metrics"]["pruned"]["heldout_perplexity"]["perplexity"],
                "base_perplexity": record["metrics"]["base"]["heldout_perplexity"]["perplexity"],
                "replacement": _numbers(record["pruning"].get("replacement")),
            }
            if tiny:
                cells[method]["removed_sub_blocks"] = record["pruning"].get("removed_sub_blocks")
                fidelity = record["metrics"].get("fidelity") or {}
                cells[method]["replacement"]["fidelity.kl_mean"] = fidelity.get("kl_mean")
            print(f"{method}: layers {cells[method]['removed_layers']} ppl {cells[method]['perplexity']:.6g}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    prov = provenance()
    model = "smollm2_135m (model.dtype=auto unless extra_overrides set it)"
    if tiny:
        model = (f"tiny random Llama ({TINY_LAYERS} layers, hidden {TINY_HIDDEN}, seed {TINY_SEED}, float32; "
                 f"{' '.join(TINY_OVERRIDES)})")
    return {"settings": {"model": model, "tiny": tiny, "ratio": 0.25, "calibration_samples": samples,
                         "heldout_windows": windows, "extra_overrides": extra or {}},
            "commit": prov.get("depthbench_git_sha") or commit, "code": str(root_of_code),
            "provenance": prov, "cells": cells}


def differences(old: dict, new: dict, rtol: float) -> list[str]:
    problems = []
    for method, before in old["cells"].items():
        after = new["cells"].get(method)
        if after is None:
            continue
        for key in ("removed_layers", "removed_sub_blocks"):
            if before.get(key) != after.get(key):
                problems.append(f"{method}: {key} {before.get(key)} -> {after.get(key)}")
        pairs = [("perplexity", before["perplexity"], after["perplexity"])]
        pairs += [(k, v, after["replacement"].get(k)) for k, v in before["replacement"].items()]
        for key, a, b in pairs:
            if a is None and b is None:
                continue
            if a is None or b is None or not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12):
                problems.append(f"{method}: {key} {a!r} -> {b!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help=f"comma-separated (default: {','.join(METHODS)}; with --tiny every "
                                          f"registered built-in method)")
    parser.add_argument("--tiny", action="store_true", help="every method on a tiny random Llama (minutes)")
    parser.add_argument("--samples", type=int, help="calibration sequences (default 32 of 256 tokens; --tiny: 2 of 32)")
    parser.add_argument("--windows", type=int, default=8, help="held-out perplexity windows")
    parser.add_argument("--output", type=Path, help="write the record here (JSON, atomically)")
    parser.add_argument("--compare", type=Path, help="a record to compare against (same settings are used)")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--commit", help="the commit an installed (non-checkout) copy was built from, for the record")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:OVERRIDE",
                        help="an extra override for one method's cell, e.g. to pin an option whose default changed "
                             "since the record (llm_streamline:pruner.options.epochs=4); repeatable")
    args = parser.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in args.set:
        method, _, override = item.partition(":")
        extra.setdefault(method, []).append(override)
    if args.compare:
        old = json.loads(args.compare.read_text())
        settings = old["settings"]
        tiny = bool(settings.get("tiny"))
        methods = args.methods.split(",") if args.methods else list(old["cells"])
        missing = sorted(set(builtin_methods()) - set(old["cells"])) if tiny else []
        if missing:
            print(f"not in the record (no before to compare with): {', '.join(missing)}")
        methods = [m for m in methods if m in old["cells"]]
        new = measure(methods, settings["calibration_samples"], settings["heldout_windows"], extra, args.commit,
                      tiny=tiny)
    else:
        methods = args.methods.split(",") if args.methods else (builtin_methods() if args.tiny else METHODS)
        samples = args.samples or (2 if args.tiny else 32)
        new = measure(methods, samples, args.windows, extra, args.commit, tiny=args.tiny)
    if args.output:
        from depthbench import atomic

        atomic.write_json(args.output, new)
    if args.compare:
        problems = differences(old, new, args.rtol)
        print(f"compared with {args.compare} (commit {old.get('commit')}): "
              + ("identical within rtol" if not problems else f"{len(problems)} difference(s)"))
        for line in problems:
            print("  " + line)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

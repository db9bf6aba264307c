"""Every registered method on tiny random models, recorded bit for bit: the check that a refactor keeps results.

    python benchmarks/method_records.py --output docs/method_records_before.json    # record
    python benchmarks/method_records.py --compare docs/method_records_before.json   # rerun and compare

Unlike `benchmarks/method_results.py` (SmolLM2 from the Hub, perplexity within a tolerance), this needs no
download and compares EXACTLY: each cell builds a tiny randomly initialised model from a transformers config
(seed 0, float32), prunes it with one method at ratio 0.25 on fixed random calibration batches, and records
the removed units, the number of layers and parameters after, and SHA-256 digests of the pruned model's
logits on fixed inputs and of its state dict (names, shapes, dtypes and bytes). Any change of what a method
chooses or of a single bit of the model it leaves is a difference.

Cells: every method of ``pruner_registry`` on a tiny Llama (8 layers) and a tiny GPT-2 (8 layers; absolute
positions, Conv1D projections), the methods that change weights or remove sub-blocks on a tiny Gemma-2 (a norm
after the MLP: the explicit-linear and through-the-norm paths), option variants that take other surgery paths
(`VARIANTS`), and Prune&Comp (``compensate=magnitude``) around a few methods. Trained methods run a few steps
only (``FAST_OPTIONS``). Torch runs on one thread so that the reductions are the same on every machine the
record is compared on. The record names the commit it was measured at (``git describe``; ``-dirty`` when
the work tree had changes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

#: Options that keep a cell to seconds on a CPU (the method's defaults otherwise).
FAST_OPTIONS: dict[str, dict] = {
    "replaceme_cosine": {"epochs": 1},
    "llm_streamline": {"max_steps": 2},
}
#: Calibration batches of 4 sequences per method (3 unless said): MKA's entropy estimate needs 51 sequences.
CALIBRATION_BATCHES: dict[str, int] = {"mka": 13}
#: Families and the methods run on each (``None``: every registered method).
FAMILIES: dict[str, list[str] | None] = {
    "llama": None,
    "gpt2": None,
    "gemma2": ["replaceme_ls", "replaceme_cosine", "linearpatch", "llm_streamline", "laco", "mka", "finercut",
               "llm_drop", "uidl"],
}
#: Prune&Comp cells: (family, method, compensate_mode, compensate_fold).
COMPENSATED = [("llama", "sleb", "iterative", "after"), ("llama", "uidl", "post", "before"),
               ("gpt2", "sleb", "post", "after"), ("gemma2", "sleb", "post", "after")]
#: Option variants that take other surgery paths: (family, method, options).
VARIANTS = [("gemma2", "replaceme_ls", {"norm_fold": "through_norm"}), ("llama", "replaceme_ls", {"diag": True}),
            ("llama", "linearpatch", {"placement": "mlp_fold"}), ("gpt2", "linearpatch", {"placement": "mlp_fold"}),
            ("gemma2", "linearpatch", {"placement": "mlp_fold", "insert_type": "diag"})]
NUM_LAYERS = 8
RATIO = 0.25


def tiny_config(family: str):
    import transformers as t

    ids = dict(vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    rope = dict(ids, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return t.LlamaConfig(**rope, tie_word_embeddings=False)
    if family == "gpt2":
        return t.GPT2Config(**ids, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=128)
    if family == "gemma2":
        return t.Gemma2Config(**rope, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"] * (NUM_LAYERS // 2))
    raise SystemExit(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")


def tiny_model(family: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family)).to(torch.float32).eval()


def batches(seed: int, n_batches: int = 3, batch_size: int = 4, seq_len: int = 16, vocab: int = 101,
            ragged: bool = True) -> list[dict]:
    """Token batches drawn from ``seed``, ids in [3, vocab); ``ragged``: right padding of varying length (pad id 0,
    mask 0; the first row of each batch full). Also the unit tests' batches (tests/helpers.py)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        if ragged:
            lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
            lengths[0] = seq_len
            for row, n in enumerate(lengths.tolist()):
                mask[row, n:] = 0
                ids[row, n:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _digest(tensors) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_cell(family: str, method: str, compensate: tuple[str, str] | None = None, options: dict | None = None) -> dict:
    """Prune a fresh tiny model of ``family`` with ``method`` and describe the result bit for bit."""
    import torch

    from depthbench.calibration.batches import CalibrationData
    from depthbench.modeling.adapters import adapter_for
    from depthbench.pruners import build_pruner

    model = tiny_model(family)
    kwargs = {}
    if compensate:
        kwargs = dict(compensate="magnitude", compensate_mode=compensate[0], compensate_fold=compensate[1])
    pruner = build_pruner(method, {**FAST_OPTIONS.get(method, {}), **(options or {})}, **kwargs)
    n_remove = round(RATIO * NUM_LAYERS)
    started = time.perf_counter()
    calibration = CalibrationData(batches(seed=0, n_batches=CALIBRATION_BATCHES.get(method, 3)), 16)
    result = pruner.prune(adapter_for(model), calibration, n_remove, progress=False)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        logits = [(f"batch{i}", model(**b, use_cache=False).logits) for i, b in enumerate(batches(seed=1, n_batches=2))]
    record = result.to_dict()
    return {
        "removed_layers": record["removed_layers"],
        "removed_sub_blocks": record["removed_sub_blocks"],
        "num_layers_after": record["num_layers_after"],
        "parameters_after": record["parameters_after"],
        "logits_sha256": _digest(logits),
        "state_dict_sha256": _digest(sorted(model.state_dict().items())),
        "seconds": round(seconds, 2),
    }


def cells() -> list[tuple[str, str, str, tuple[str, str] | None, dict | None]]:
    """(key, family, method, compensation, options) for every cell, in a fixed order."""
    from depthbench.pruners import pruner_registry

    out = []
    for family, methods in FAMILIES.items():
        for method in methods or pruner_registry.names():
            out.append((f"{family}/{method}", family, method, None, None))
    for family, method, options in VARIANTS:
        label = ",".join(f"{k}={v}" for k, v in options.items())
        out.append((f"{family}/{method}[{label}]", family, method, None, options))
    for family, method, mode, fold in COMPENSATED:
        out.append((f"{family}/{method}+comp_{mode}_{fold}", family, method, (mode, fold), None))
    return out


def record_all(only: list[str] | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    out = {}
    for key, family, method, compensate, options in cells():
        if only and key not in only:
            continue
        out[key] = run_cell(family, method, compensate, options)
        print(f"{key}: removed {out[key]['removed_layers']} {out[key]['removed_sub_blocks']} "
              f"({out[key]['seconds']} s)", file=sys.stderr, flush=True)
    return out


COMPARED = ("removed_layers", "removed_sub_blocks", "num_layers_after", "parameters_after", "logits_sha256",
            "state_dict_sha256")


def differences(before: dict, after: dict) -> list[str]:
    """One line per cell and field that differs (cells missing on either side included)."""
    lines = []
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            lines.append(f"{key}: only {'after' if key in after else 'before'}")
            continue
        for field in COMPARED:
            if before[key].get(field) != after[key].get(field):
                lines.append(f"{key}: {field} {before[key].get(field)!r} -> {after[key].get(field)!r}")
    return lines


def _commit() -> str:
    import subprocess

    proc = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    return proc.stdout.strip() or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="write the record here (JSON)")
    parser.add_argument("--compare", type=Path, help="rerun and compare bit for bit with this record")
    parser.add_argument("--only", nargs="*", help="cells to run (e.g. llama/shortgpt); default: all")
    args = parser.parse_args(argv)
    if not args.output and not args.compare:
        parser.error("give --output and/or --compare")
    if args.compare and not args.compare.is_file():
        parser.error(f"--compare {args.compare}: no such file")
    records = record_all(args.only)
    if args.output:
        from depthbench import atomic

        atomic.write_json(args.output, {"commit": _commit(), "cells": records})
    if args.compare:
        before = json.loads(args.compare.read_text())["cells"]
        if args.only:
            before = {k: v for k, v in before.items() if k in args.only}
        diff = differences(before, records)
        print("\n".join(diff) if diff else f"all {len(records)} cells identical", flush=True)
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

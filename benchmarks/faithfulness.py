"""The reproduction study of issue 15 (SKELETON: the grid runs, the study itself has not been run).

    python benchmarks/faithfulness.py --output faithfulness.json                 # the grid (hours on a CPU)
    python benchmarks/faithfulness.py --tiny --output /tmp/f.json                # every cell at a tiny budget

On SmolLM2 (the embedded default) at ratio 0.25: held-out perplexity, KL to the dense model (where the
evaluation computes it) and each fit's convergence record against the training budget, for
ReplaceMe-cosine (cosine and mse objectives, two learning rates), ReplaceMe-LS (the closed-form optimum of the
mse objective), LLM-Streamline (mse and lm losses, per-document and packed calibration) and UIDL (the block
dropped with nothing in its place, the level every replacement should beat). Steps grow geometrically
(``--epochs`` for ReplaceMe-cosine, ``--steps`` for LLM-Streamline). One JSON record, written atomically:
per cell the overrides, removed layers, perplexity, KL, ``pruning.budget`` and the replacement's
convergence summary. Writing docs/FAITHFULNESS.md from a record is for the session that runs the study.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def grid(epochs: list[int], steps: list[int], lrs: list[float]) -> list[tuple[str, list[str]]]:
    """``(label, overrides)`` of every cell."""
    cells = [("uidl", ["pruner=uidl"]), ("replaceme_ls", ["pruner=replaceme_ls"])]
    for loss in ("cosine", "mse"):
        for lr in lrs:
            for e in epochs:
                cells.append((f"replaceme_cosine loss={loss} lr={lr:g} epochs={e}",
                              ["pruner=replaceme_cosine", f"pruner.options.loss={loss}", f"pruner.options.lr={lr}",
                               f"pruner.options.epochs={e}"]))
    for loss in ("mse", "lm"):
        for packing in (False, True):
            for s in steps:
                cells.append((f"llm_streamline loss={loss} packing={str(packing).lower()} steps={s}",
                              ["pruner=llm_streamline", f"pruner.options.loss={loss}", f"pruner.options.max_steps={s}",
                               f"calibration.packing={str(packing).lower()}"]))
    return cells


def _convergence(replacement: dict | None) -> list[dict]:
    """The convergence summaries of a replacement (one per ReplaceMe block, one for Streamline), curves dropped
    to keep the record small, the least-squares gap kept."""
    if not replacement:
        return []
    fits = replacement.get("blocks") or [replacement]
    out = []
    for fit in fits:
        if "convergence" not in fit:
            continue
        summary = {k: v for k, v in fit["convergence"].items() if k != "curve"}
        if "ls_optimum" in fit:
            summary["ls_relative_gap"] = fit["ls_optimum"]["relative_gap"]
        out.append(summary)
    return out


def measure(cells: list[tuple[str, list[str]]], common: list[str]) -> dict:
    sys.path.insert(0, str(REPO))
    from depthbench.experiments.pipeline import run
    from tests.integration.conftest import compose

    root = Path(tempfile.mkdtemp(prefix="depthbench-faithfulness-"))
    out = {}
    try:
        for i, (label, overrides) in enumerate(cells):
            cfg = compose(*overrides, *common, f"cache.dir={root / 'cache'}")
            record = run(cfg, root / f"cell{i}")
            metrics, pruning = record["metrics"], record["pruning"]
            out[label] = {
                "overrides": overrides,
                "removed_layers": pruning["removed_layers"],
                "perplexity": metrics["pruned"]["heldout_perplexity"]["perplexity"],
                "kl": (metrics.get("fidelity") or {}).get("kl_mean"),
                "budget": pruning.get("budget"),
                "convergence": _convergence(pruning.get("replacement")),
            }
            print(f"{label}: ppl {out[label]['perplexity']:.6g} budget {out[label]['budget']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="1,10,100", help="ReplaceMe-cosine epochs, comma-separated")
    parser.add_argument("--steps", default="15,150,1500", help="LLM-Streamline optimiser steps, comma-separated")
    parser.add_argument("--lrs", default="1e-4,1e-3", help="ReplaceMe-cosine learning rates, comma-separated")
    parser.add_argument("--windows", type=int, default=16, help="held-out perplexity windows")
    parser.add_argument("--tiny", action="store_true",
                        help="every cell at a tiny budget (scale=fast, 1 epoch / 1 step): a smoke test")
    parser.add_argument("--output", type=Path, required=True, help="the JSON record (written atomically)")
    args = parser.parse_args(argv)
    from depthbench.atomic import write_json

    common = ["ratio=0.25", "benchmark=none", "efficiency.enabled=false", "logger=none", "progress=false",
              "save_model=false", "cache.base_results=false", f"evaluation.perplexity.max_windows={args.windows}"]
    if args.tiny:
        epochs, steps, lrs = [1], [1], [1e-4]
        common = [*common[:-1], "scale=fast"]
    else:
        epochs = [int(x) for x in args.epochs.split(",")]
        steps = [int(x) for x in args.steps.split(",")]
        lrs = [float(x) for x in args.lrs.split(",")]
    cells = measure(grid(epochs, steps, lrs), common)
    write_json(args.output, {"settings": {"model": "smollm2_135m", "ratio": 0.25, "common_overrides": common},
                             "cells": cells})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

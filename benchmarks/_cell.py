"""One measured pruning cell, run in its own process so its peak RSS is its own.

    python benchmarks/_cell.py OVERRIDE [OVERRIDE ...]

Runs the pipeline's own steps (config checks, calibration data, weights), times one bare forward pass over the
same calibration batches (no hooks), then prunes with the pipeline's prune step (its caches, activation store and
store-or-recompute decision) and prints one JSON line: the bare-forward seconds, each pruning stage's seconds and
peak RSS, what the activation strategy ran, where a trained replacement's rows were, and the calibration size.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(overrides: list[str]) -> None:
    import tempfile
    from pathlib import Path

    from depthbench.benchmarks._config import compose
    from depthbench.experiments.pipeline import (RunContext, check_config, load_calibration_data, load_weights,
                                                 prune)

    from depthbench.allocator import keep_freed_memory

    keep_freed_memory()  # as the pipeline's run does
    cfg = compose(*overrides)
    with tempfile.TemporaryDirectory(prefix="depthbench-cell-") as tmp:
        # the pipeline's own steps: the same config checks, caches, activation store (in memory where it fits
        # cache.activations_memory_gb) and store-or-recompute decision as a run of the depthbench command
        ctx = RunContext(cfg, Path(tmp))
        checked = check_config(ctx)
        inputs = load_calibration_data(ctx)
        loaded = load_weights(ctx, checked, inputs)
        model, data = loaded.loaded.model, inputs.calibration
        with torch.no_grad():
            model(**data.batches[0], use_cache=False)  # warm-up
            start = time.perf_counter()
            for batch in data.batches:
                model(**batch, use_cache=False)
            bare = time.perf_counter() - start
        outcome = prune(ctx, checked, inputs, loaded)
    result, activations = outcome.result, outcome.activations
    print(json.dumps({"method": result.method, "ratio": cfg.ratio, "dtype": str(cfg.model.dtype),
                      "bare_forward_s": bare,
                      "activations": activations,
                      "activations_stored": activations.get("ran") == "store",
                      "activation_store_bytes": activations.get("store_bytes", 0),
                      "prune_s": sum(s["seconds"] for s in result.stages.values()),
                      "peak_rss_bytes": max(s["peak_rss_bytes"] for s in result.stages.values()),
                      "stages": result.stages, "n_samples": data.n_samples, "n_tokens": data.n_tokens,
                      "training_precision": (result.replacement or {}).get("precision"),
                      "training_rows": training_rows(result.replacement)}))


def training_rows(replacement) -> str | None:
    """Where a trained replacement's rows were (``memory`` / ``disk``), None where nothing trained."""
    from depthbench.benchmarks._record import values_of

    return ", ".join(sorted(set(values_of(replacement, "training_rows")))) or None


if __name__ == "__main__":
    main(sys.argv[1:])

"""One measured pruning cell, run in its own process so its peak RSS is its own.

    python benchmarks/_cell.py OVERRIDE [OVERRIDE ...]

Loads the model and calibration data as the pipeline does, times one bare forward pass over the same
calibration batches (no hooks), then prunes and prints one JSON line: the bare-forward seconds, each
pruning stage's seconds and peak RSS, and the calibration size.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(overrides: list[str]) -> None:
    from depthbench.benchmarks._config import compose
    from depthbench.calibration.batches import load_calibration
    from depthbench.calibration.cache import StatisticsCache
    from pathlib import Path

    from depthbench.calibration.activations import ActivationSlot
    from depthbench.settings import CacheSettings
    from depthbench.experiments.pipeline import layers_to_remove
    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.loading import load_model, model_fingerprint
    from depthbench.pruners import build_pruner
    from omegaconf import OmegaConf

    cfg = compose(*overrides)
    loaded = load_model(cfg.model)
    adapter = adapter_for(loaded.model)
    data = load_calibration(cfg.calibration, loaded.tokenizer)
    with torch.no_grad():
        loaded.model(**data.batches[0], use_cache=False)  # warm-up
        start = time.perf_counter()
        for batch in data.batches:
            loaded.model(**batch, use_cache=False)
        bare = time.perf_counter() - start
    options = cfg.pruner.get("options")
    pruner = build_pruner(cfg.pruner.name, OmegaConf.to_container(options, resolve=True) if options else {})
    cache = StatisticsCache(cfg.cache.dir, model_fingerprint(loaded, cfg.model)) if cfg.cache.get("dir") else None
    budget = CacheSettings.from_config(cfg.cache).activation_budget()
    with pruner.service(adapter, data, cache=cache, activation_budget_bytes=budget, progress=False) as service:
        result = pruner.prune(adapter, service, layers_to_remove(cfg.ratio, adapter.num_layers))
    slot = ActivationSlot(Path("unused"), budget)  # the writer's own size and budget decision
    size = slot.store_size(adapter, data.batches)
    print(json.dumps({"method": pruner.name, "ratio": cfg.ratio, "bare_forward_s": bare,
                      "activations_stored": bool(pruner.fit_reads_activations and slot.admits(size)),
                      "activation_store_bytes": size,
                      "prune_s": sum(s["seconds"] for s in result.stages.values()),
                      "peak_rss_bytes": max(s["peak_rss_bytes"] for s in result.stages.values()),
                      "stages": result.stages, "n_samples": data.n_samples, "n_tokens": data.n_tokens,
                      "training_precision": (result.replacement or {}).get("precision")}))


if __name__ == "__main__":
    main(sys.argv[1:])

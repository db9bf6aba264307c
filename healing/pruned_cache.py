"""The pruned-only evaluation, computed once per pruned model and reused by every healing budget.

A sweep over ``healing`` prunes the same model once per cell (pruning is cheap once the calibration
statistics are cached) but evaluates the pruned-only model once: the entry is keyed by the run's config
hash with ``healing`` set to ``none`` and without ``save_model`` (so the ``healing=none`` cell and every
``lora`` cell of the same method, ratio, data and evaluation share it), stored in the result cache
(`depthbench.evaluation.result_cache`, same atomic writes, same lock so concurrent cells compute it
once). The entry also holds a SHA-256 of the pruned weights: a hit whose weights differ from this
cell's pruned model (pruning that is not reproducible) is not used, and the numbers are recomputed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import depthbench
from depthbench.evaluation import result_cache
from depthbench.experiments.resume import config_hash

log = logging.getLogger(__name__)

KIND = "pruned_only"


def unhealed_hash(cfg: DictConfig) -> str:
    """The config hash of the same cell with ``healing=none``, leaving out ``save_model`` (whether the model
    is written to disk changes none of its numbers)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["healing"] = {"name": "none"}
    plain.pop("save_model", None)
    return config_hash(plain)


def weights_digest(model) -> str:
    """SHA-256 over the parameter and buffer names, shapes, dtypes and bytes (in state-dict order)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: Bumped when the pruned metrics gain a field (2: the fidelity's per-window sums, for paired ranking), so an
#: entry written before is recomputed rather than served without it.
METRICS_FORMAT = 2


def material(cfg: DictConfig) -> dict:
    return {"kind": KIND, "format": result_cache.FORMAT, "metrics_format": METRICS_FORMAT,
            "config_hash_without_healing": unhealed_hash(cfg),
            "depthbench": depthbench.__version__}


def cached_pruned_metrics(cache_dir: Path | None, cfg: DictConfig, model, compute: Callable[[], dict],
                          stale_after_s: float | None = None) -> tuple[dict, bool]:
    """``(metrics, hit)``: the pruned-only metrics (``compute()`` returns a JSON-able dict) from the cache
    when its weights digest matches ``model``, else computed (and stored when ``cache_dir`` is given)."""
    if cache_dir is None:
        return compute(), False
    digest = weights_digest(model)
    key = material(cfg)

    def entry() -> dict:
        return {"weights_sha256": digest, "metrics": compute()}

    lock = {} if stale_after_s is None else {"stale_after_s": stale_after_s}
    stored, hit = result_cache.cached_result(cache_dir, key, entry, "the pruned-only metrics", **lock)
    if hit and stored.get("weights_sha256") != digest:
        log.warning("cached pruned-only metrics were computed on other pruned weights (pruning not reproducible?); "
                    "recomputing them for this cell")
        stored = entry()
        result_cache.store(cache_dir, key, stored)
        hit = False
    return stored["metrics"], hit

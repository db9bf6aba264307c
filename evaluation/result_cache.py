"""Results computed once and reused by every cell of a sweep: JSON entries keyed by a SHA-256 of their material.

Three kinds of entry live here, each with its own material (everything that determines the numbers):
the base model's evaluation (`base_evaluation_material`: the model's source, revision and dtype, the benchmark
config, the data version, the lm-eval and depthbench versions), the manifest of a dense fidelity reference
(`depthbench.evaluation.fidelity.cached_reference`) and a pruned model's metrics shared by its healing cells
(`depthbench.healing.pruned_cache`). Entries are JSON files written atomically; a file that cannot be read,
or whose stored key does not match, is treated as absent and recomputed. Concurrent cells compute an entry
once (`depthbench.locking.EntryLock`). The folder keeps its first name, ``base_results``, so that caches
written before stay valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import depthbench
from depthbench import atomic
from depthbench.locking import STALE_AFTER_S, EntryLock

log = logging.getLogger(__name__)

CACHE_SUBDIR = "base_results"
FORMAT = 2  # 2: benchmark.limit draws a stratified seeded sample (it took the first N before)


def _plain(obj):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


def base_evaluation_material(model_source: str, revision: str | None, dtype: str, benchmark_cfg: Mapping,
                 extra: Mapping | None = None) -> dict:
    """What the base result depends on (stored next to the result, so a hit can be verified)."""
    from depthbench.evaluation.lm_eval_runner import lm_eval_version, offline_data_version

    bench = _plain(benchmark_cfg)
    return {
        "format": FORMAT,
        "model": {"source": str(model_source), "revision": revision, "dtype": str(dtype)},
        "benchmark": bench,
        "data": offline_data_version([t["name"] for t in bench.get("tasks") or ()]) if bench.get("offline") else "hub",
        "lm_eval": lm_eval_version(),
        "depthbench": depthbench.__version__,
        "extra": _plain(dict(extra)) if extra else None,
    }


def cache_key(material: Mapping) -> str:
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR / f"{key}.json"


def load(cache_dir: str | Path, material: Mapping) -> dict | None:
    """The cached result for ``material``, or None (missing, unreadable, or written for another key)."""
    key = cache_key(material)
    path = cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry["key"] != key or cache_key(entry["material"]) != key or not isinstance(entry["result"], dict):
            raise ValueError("key mismatch")
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable result-cache file %s (%s); recomputing", path, err)
        return None
    return entry["result"]


def store(cache_dir: str | Path, material: Mapping, result: dict) -> Path:
    key = cache_key(material)
    path = cache_path(cache_dir, key)
    atomic.write_json(path, {"key": key, "material": dict(material), "result": result})
    return path


def cached_result(cache_dir: str | Path, material: Mapping, compute: Callable[[], dict], what: str,
                  stale_after_s: float = STALE_AFTER_S) -> tuple[dict, bool]:
    """``(result, hit)``: the cached entry for ``material``, or ``compute()`` stored for the next run. Cells
    running at the same time compute it once: the first takes the entry's `EntryLock` (``what`` names the
    entry in the lock's messages), the others wait and read."""
    result = load(cache_dir, material)
    if result is not None:
        return result, True
    path = cache_path(cache_dir, cache_key(material))
    with EntryLock(path.with_name(f".{path.stem}.lock"), what=what,
                   stale_after_s=stale_after_s):
        result = load(cache_dir, material)
        if result is not None:
            return result, True
        result = compute()
        store(cache_dir, material, result)
    return result, False

"""What makes two runs the same cell of a sweep, and finding a cell's finished result.

A run's identity is a hash of its resolved config minus keys that do not change results (progress
bars, debug tracebacks, logging destination). A rerun whose output directory, or any run directory
under the same sweep, already holds a result record with that hash does no work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from depthbench.settings import without_added_defaults

# Keys that do not influence what a run computes.
NON_SEMANTIC_KEYS = ("progress", "debug", "logger", "resume", "hydra", "cache", "paths")
RESULT_FILE = "result.json"


def config_hash(cfg: DictConfig | dict) -> str:
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    data = {k: v for k, v in without_added_defaults(data).items() if k not in NON_SEMANTIC_KEYS}
    if data.get("healing") == {"name": "none"}:  # the default: runs from before the healing group keep their hash
        del data["healing"]
    model = data.get("model")
    if isinstance(model, dict) and not model.get("layerwise", False):
        # in memory (the default): runs from before the layer-wise setting existed keep their hash; the
        # buffer size changes where activations live, never a result
        data["model"] = {k: v for k, v in model.items() if not k.startswith("layerwise")}
    elif isinstance(model, dict):
        data["model"] = {k: v for k, v in model.items() if k != "layerwise_buffer_gb"}
    pruner = data.get("pruner")
    if isinstance(pruner, dict) and pruner.get("compensate", "none") == "none":
        # Prune&Comp off (the default): runs from before the setting existed keep their hash
        data["pruner"] = {k: v for k, v in pruner.items() if not k.startswith("compensate")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_record(path: Path) -> dict | None:
    """A result record, or None if it is missing or unreadable (a half-written file never is, but
    a hand-edited or truncated one is treated as absent and the cell is redone)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "config_hash" in record else None


def find_finished(output_dir: Path, digest: str, search_root: Path | None = None) -> dict | None:
    """The finished record with ``digest`` in ``output_dir`` or anywhere under ``search_root``."""
    candidates = [output_dir / RESULT_FILE]
    if search_root is not None and search_root.is_dir():
        candidates += sorted(search_root.rglob(RESULT_FILE))
    for path in candidates:
        record = read_record(path) if path.is_file() else None
        if record is not None and record["config_hash"] == digest:
            return record
    return None


def remove_stale_temporaries(output_dir: Path) -> None:
    """Leftovers of a killed run's atomic writes (``.name.XXXX.tmp``)."""
    if not output_dir.is_dir():
        return
    for path in output_dir.glob(".*.tmp"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

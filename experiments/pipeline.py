"""One run: validate -> load -> calibrate -> evaluate base -> prune -> evaluate pruned -> save -> record.

All checks that need no weights run first, so bad input fails in a second with one clear line and
nothing on disk. Outputs (``pruned_model/``, ``result.json``) are written atomically at the end.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from calibration.batches import load_calibration, validate_sizes
from calibration.sources import build_source
from depthbench import atomic
from depthbench.errors import ConfigError
from depthbench.measure import StageTimer
from depthbench.provenance import provenance
from evaluation.perplexity import heldout_windows, perplexity
from modeling.adapters import adapter_for
from modeling.loading import check_model_reference, load_model
from modeling.saving import METADATA_FILE, save_pruned
from pruners import build_pruner

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
MODEL_DIR = "pruned_model"
SCHEMA_VERSION = 1


def layers_to_remove(ratio: float, num_layers: int) -> int:
    """``round(r * L)``, rounding halves up; must leave at least one layer and remove at least one."""
    n = int(math.floor(ratio * num_layers + 0.5))
    if n < 1:
        raise ConfigError(f"ratio={ratio} removes no layer of {num_layers}; the smallest useful ratio is {0.5 / num_layers:.4g}")
    if n >= num_layers:
        raise ConfigError(f"ratio={ratio} removes all {num_layers} layers; use a ratio below {(num_layers - 0.5) / num_layers:.4g}")
    return n


def validate_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ConfigError(f"ratio={ratio!r} is not a number; allowed: 0 < ratio < 1")
    if not 0 < ratio < 1 or math.isnan(ratio):
        raise ConfigError(f"ratio={ratio} is out of range; allowed: 0 < ratio < 1")
    return float(ratio)


def validate(cfg: DictConfig, output_dir: Path):
    """Every check that needs no model weights. Returns the pruner, built from its options."""
    ratio = validate_ratio(cfg.ratio)
    if cfg.pruner.get("name") is None:
        raise ConfigError("pruner.name is not set")
    pruner = build_pruner(cfg.pruner.name, OmegaConf.to_container(cfg.pruner.get("options") or {}, resolve=True))
    c = cfg.calibration
    validate_sizes(c.n_samples, c.seq_len, c.batch_size)
    build_source(c).check()
    if cfg.evaluate:
        build_source(cfg.evaluation.perplexity).check()
    check_model_reference(cfg.model)
    _check_writable(output_dir)
    return ratio, pruner


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {str(directory)!r} is not writable: {err.strerror}") from err


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    output_dir = Path(output_dir)
    ratio, pruner = validate(cfg, output_dir)
    progress = bool(cfg.progress)
    timer = StageTimer()
    started = time.time()

    with timer.stage("load"):
        loaded = load_model(cfg.model, device=None if cfg.model.get("device_map") else resolve_device(cfg.device))
    adapter = adapter_for(loaded.model)
    n_remove = layers_to_remove(ratio, adapter.num_layers)
    pruner.check_feasible(adapter.num_layers, n_remove)

    with timer.stage("calibration_data"):
        calibration = load_calibration(cfg.calibration, loaded.tokenizer)
    for note in calibration.notes:
        log.warning(note)

    metrics: dict = {}
    if cfg.evaluate:
        with timer.stage("evaluation_data"):
            windows = heldout_windows(cfg.evaluation.perplexity, loaded.tokenizer)
        with timer.stage("evaluate_base"):
            metrics["base"] = {"heldout_perplexity": perplexity(loaded.model, windows.batches, progress, "base perplexity")}

    result = pruner.prune(adapter, calibration, n_remove, progress=progress)
    timer.add(result.stages, prefix="prune.")

    if cfg.evaluate:
        with timer.stage("evaluate_pruned"):
            metrics["pruned"] = {"heldout_perplexity": perplexity(loaded.model, windows.batches, progress, "pruned perplexity")}

    config = OmegaConf.to_container(cfg, resolve=True)
    prov = provenance()
    pruning = result.to_dict()
    model_dir = None
    if cfg.save_model:
        with timer.stage("save"):
            metadata = {
                "schema_version": SCHEMA_VERSION,
                "base_model": {"name": loaded.name, "source": loaded.source},
                "ratio": ratio,
                **pruning,
                "calibration": {"description": calibration.description, "n_samples": calibration.n_samples,
                                "n_tokens": calibration.n_tokens, "seq_len": calibration.seq_len},
                "seed": cfg.seed,
                "config": config,
                "provenance": prov,
            }
            model_dir = save_pruned(loaded.model, loaded.tokenizer, output_dir / MODEL_DIR, metadata)

    record = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": loaded.name, "source": loaded.source, "dtype": cfg.model.dtype},
        "method": pruner.name,
        "ratio": ratio,
        "seed": cfg.seed,
        "pruning": pruning,
        "calibration": {"description": calibration.description, "n_samples": calibration.n_samples,
                        "n_tokens": calibration.n_tokens, "seq_len": calibration.seq_len},
        "metrics": metrics,
        "stages": timer.to_dict(),
        "wall_seconds": round(time.time() - started, 3),
        "pruned_model_dir": str(model_dir) if model_dir else None,
        "config": config,
        "provenance": prov,
    }
    atomic.write_json(output_dir / RESULT_FILE, record)
    return record

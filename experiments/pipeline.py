"""One run: validate -> load -> calibrate -> evaluate base -> prune -> evaluate pruned -> save -> record.

All checks that need no weights run first, so bad input fails in a second with one clear line and
nothing on disk. Outputs (``pruned_model/``, ``result.json``) are written atomically at the end.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from depthbench.calibration.activations import auto_budget
from depthbench.calibration.batches import load_calibration, validate_sizes
from depthbench.calibration.cache import StatisticsCache
from depthbench.calibration.sources import build_source
from depthbench import atomic
from depthbench.errors import ConfigError, NumericalError
from depthbench.locking import STALE_AFTER_S
from depthbench.measure import StageTimer
from depthbench.provenance import provenance
from depthbench.evaluation.base_cache import cached_base_result, key_material
from depthbench.evaluation.perplexity import heldout_windows
from depthbench.evaluation.retention import retention_report
from depthbench.evaluation.suite import (check_evaluation, dense_copy, fidelity, fidelity_enabled, fidelity_reference,
                                         has_benchmark, quality, speed)
from depthbench.experiments.resume import RESULT_FILE, config_hash, find_finished, remove_stale_temporaries
from depthbench.experiments.tracking import build_tracker
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.loading import (
    check_model_reference, default_cache_dir, load_model, load_tokenizer, model_fingerprint, num_layers_of,
    resolve_dtype,
)
from depthbench.modeling.saving import save_pruned
from depthbench.pruners import build_pruner
from depthbench.pruners.base import DEFAULT_ACTIVATION_BUDGET

log = logging.getLogger(__name__)

MODEL_DIR = "pruned_model"
SCHEMA_VERSION = 1


def layers_to_remove(ratio: float, num_layers: int) -> int:
    """``round(r * L)``, rounding halves up; must leave at least one layer and remove at least one."""
    n = int(math.floor(ratio * num_layers + 0.5))
    if n < 1:
        raise ConfigError(f"ratio={ratio} removes no layer of {num_layers}; the smallest useful ratio is "
                          f"{0.5 / num_layers:.4g}")
    if n >= num_layers:
        raise ConfigError(f"ratio={ratio} removes all {num_layers} layers; use a ratio below "
                          f"{(num_layers - 0.5) / num_layers:.4g}")
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
    options = cfg.pruner.get("options")
    pruner = build_pruner(cfg.pruner.name, OmegaConf.to_container(options, resolve=True) if options else {})
    c = cfg.calibration
    validate_sizes(c.n_samples, c.seq_len, c.batch_size)
    build_source(c).check()
    if cfg.evaluate:
        check_evaluation(cfg.evaluation, cfg.efficiency)
    check_model_reference(cfg.model)
    num_layers = num_layers_of(cfg.model)  # config.json or the GGUF header: no weights
    if num_layers is not None:
        pruner.check_feasible(num_layers, layers_to_remove(ratio, num_layers))
    if cfg.evaluate and has_benchmark(cfg.benchmark):
        from depthbench.evaluation.lm_eval_runner import check_tasks, parse_benchmark

        parse_benchmark(cfg.benchmark)
        if not cfg.benchmark.get("offline"):
            check_tasks(cfg.benchmark)  # builds lm-eval's task index: seconds, still before any weights
    activation_budget(cfg)
    lock_stale_after(cfg)
    tracker = build_tracker(cfg.logger)
    _check_writable(output_dir)
    return ratio, pruner, tracker


def activation_budget(cfg: DictConfig, store_dir: Path | None = None) -> int:
    """``cache.activations_gb`` in bytes: the disk space one model's stored calibration activations
    may take (0 = never store them; ``auto`` = `auto_budget` of the file system of ``store_dir``,
    default the temporary directory that single runs use)."""
    value = (cfg.get("cache") or {}).get("activations_gb", DEFAULT_ACTIVATION_BUDGET / 1024**3)
    if value == "auto":
        return auto_budget(store_dir if store_dir is not None else tempfile.gettempdir())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ConfigError(f"cache.activations_gb={value!r}; allowed: auto, or a number of GiB >= 0 (0 = do not "
                          f"store activations)")
    return int(value * 1024**3)


def lock_stale_after(cfg: DictConfig) -> float:
    """``cache.lock_stale_s``: seconds without a heartbeat after which a cache lock is taken over."""
    value = (cfg.get("cache") or {}).get("lock_stale_s", STALE_AFTER_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"cache.lock_stale_s={value!r}; allowed: a number of seconds > 0")
    return float(value)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {str(directory)!r} is not writable: {err.strerror}") from err


def cache_root(cfg: DictConfig, sweep_dir: Path | None) -> Path:
    """Shared caches (calibration statistics, base-model results): ``cache.dir``, else the sweep's
    ``.cache`` (shared by its cells), else the user cache (``$DEPTHBENCH_CACHE`` or ``~/.cache/depthbench``)."""
    settings = cfg.get("cache") or {}
    if settings.get("dir"):
        return Path(settings["dir"])
    return Path(sweep_dir) / ".cache" if sweep_dir else default_cache_dir()


def statistics_dir(cfg: DictConfig, sweep_dir: Path | None) -> Path:
    """Where calibration statistics and stored activations are cached (under `cache_root`)."""
    return cache_root(cfg, sweep_dir) / "statistics"


def base_result_material(cfg: DictConfig, fingerprint: str) -> dict:
    """What the base model's quality numbers depend on: the weights, the benchmark, the held-out text."""
    return key_material(fingerprint, cfg.model.get("revision"), cfg.model.dtype,
                        OmegaConf.to_container(cfg.benchmark, resolve=True),
                        extra={"perplexity": OmegaConf.to_container(cfg.evaluation.perplexity, resolve=True)})


def compare(base: dict, pruned: dict, speeds: dict | None) -> dict:
    """Retention (pruned / base per task, average in %, 95% intervals) and speed-up, from measured numbers."""
    out: dict = {}
    if "tasks" in base and "tasks" in pruned:
        out["retention"] = retention_report(base, pruned)
    if speeds:
        out["speed"] = {k: v for k, v in speeds.items() if k != "speedup"}
        out["speedup"] = speeds["speedup"]
    return out


def check_finite_parameters(model) -> None:
    """Stop before anything is saved if pruning produced a NaN/Inf weight."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NumericalError(f"non-finite weights after pruning in {', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}; nothing was saved")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(cfg: DictConfig, output_dir: str | Path, sweep_dir: str | Path | None = None,
        group: str = "single", name: str | None = None, after_prune=None) -> dict:
    """Run one cell. With ``resume``, a finished record with the same config hash in ``output_dir``
    or anywhere under ``sweep_dir`` is returned as it is (marked ``resumed``) and nothing is redone.
    ``after_prune(model, tokenizer)``, if given, sees the pruned model in memory before it is saved."""
    output_dir = Path(output_dir)
    ratio, pruner, tracker = validate(cfg, output_dir)
    # model.dtype=auto becomes the dtype it means on this machine before anything keys on the config
    # (resume hash, caches, the record), so runs in different dtypes are never mixed up
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, "cuda" if cfg.model.get("device_map") else
                                    resolve_device(cfg.device))
    digest = config_hash(cfg)
    if cfg.get("resume", True):
        finished = find_finished(output_dir, digest, Path(sweep_dir) if sweep_dir else None)
        if finished is not None:
            log.info("cell %s already finished; nothing to do", digest)
            return {**finished, "resumed": True}
    remove_stale_temporaries(output_dir)
    progress = bool(cfg.progress)
    timer = StageTimer()
    started = time.time()

    # The tokenizer alone first: calibration text that is empty, too short or not UTF-8 fails before
    # any weights are read (or the packaged GGUF is converted).
    with timer.stage("calibration_data"):
        tokenizer = load_tokenizer(cfg.model)
        calibration = load_calibration(cfg.calibration, tokenizer)
    for note in calibration.notes:
        log.warning(note)

    with timer.stage("load"):
        loaded = load_model(cfg.model, device=None if cfg.model.get("device_map") else resolve_device(cfg.device),
                            tokenizer=tokenizer)
    adapter = adapter_for(loaded.model)
    pruner.check_model(adapter)
    n_remove = layers_to_remove(ratio, adapter.num_layers)
    pruner.check_feasible(adapter.num_layers, n_remove)

    caches = cache_root(cfg, sweep_dir)
    settings = cfg.get("cache") or {}
    fingerprint = model_fingerprint(loaded, cfg.model)
    metrics: dict = {}
    if cfg.evaluate:
        with timer.stage("evaluation_data"):
            windows = heldout_windows(cfg.evaluation.perplexity, loaded.tokenizer)
        with timer.stage("evaluate_base"):
            def compute():
                return quality(loaded.model, loaded.tokenizer, windows, cfg.benchmark, default_cache_dir(), progress,
                               "base")

            if settings.get("base_results", True):
                metrics["base"], hit = cached_base_result(caches, base_result_material(cfg, fingerprint), compute,
                                                          stale_after_s=lock_stale_after(cfg))
                metrics["base_from_cache"] = hit
            else:
                metrics["base"] = compute()
        reference = dense = None
        if fidelity_enabled(cfg.evaluation):
            with timer.stage("fidelity_reference"):
                reference, _ = fidelity_reference(
                    loaded.model, windows, cfg.evaluation, caches if settings.get("base_results", True) else None,
                    base_result_material(cfg, fingerprint), progress, stale_after_s=lock_stale_after(cfg))
        if cfg.efficiency.get("enabled", True):
            with timer.stage("dense_copy"):  # pruning edits the model in place; speed times both interleaved
                dense, dense_bytes = dense_copy(loaded.model)

    stats_cache = (StatisticsCache(statistics_dir(cfg, sweep_dir), fingerprint, lock_stale_after(cfg))
                   if settings.get("statistics", True) else None)
    # Stored activations (GBs) persist where the caches are the user's own choice: a sweep's
    # directory or an explicit cache.dir; a single run keeps them in a temporary directory.
    keep = sweep_dir is not None or bool((cfg.get("cache") or {}).get("dir"))
    store_dir = statistics_dir(cfg, sweep_dir) if keep and stats_cache is not None else None
    with pruner.service(adapter, calibration, cache=stats_cache, keep_activations=keep, progress=progress,
                        activation_budget_bytes=activation_budget(cfg, store_dir)) as service:
        result = pruner.prune(adapter, service, n_remove)
    timer.add(result.stages, prefix="prune.")

    if cfg.evaluate:
        with timer.stage("evaluate_pruned"):
            metrics["pruned"] = quality(loaded.model, loaded.tokenizer, windows, cfg.benchmark, default_cache_dir(),
                                        progress, "pruned")
        if reference is not None:
            with timer.stage("fidelity"):
                metrics["fidelity"] = fidelity(loaded.model, windows, reference, metrics["base"], metrics["pruned"],
                                               progress)
        speeds = None
        if dense is not None:
            with timer.stage("speed"):
                speeds = speed(dense, loaded.model, loaded.tokenizer, cfg.efficiency)
                speeds["dense_copy_bytes"] = dense_bytes
            del dense
        metrics.update(compare(metrics["base"], metrics["pruned"], speeds))

    check_finite_parameters(loaded.model)
    if after_prune is not None:
        after_prune(loaded.model, loaded.tokenizer)
    config = OmegaConf.to_container(cfg, resolve=True)
    prov = provenance()
    pruning = result.to_dict()
    model_dir = None
    if cfg.save_model:
        with timer.stage("save"):
            metadata = {
                "schema_version": SCHEMA_VERSION,
                "config_hash": digest,
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
        "config_hash": digest,
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
    tracker.log_run(record, output_dir, group=group, name=name or f"{pruner.name}-r{ratio}-{digest[:6]}")
    return record

"""One run: validate -> load -> calibrate -> evaluate base -> prune -> evaluate pruned -> save -> record.

All checks that need no weights run first, so bad input fails in a second with one clear line and
nothing on disk. Outputs (``pruned_model/``, ``result.json``) are written atomically at the end.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from depthbench.calibration.batches import load_calibration, validate_sizes
from depthbench.calibration.cache import StatisticsCache
from depthbench.calibration.sources import build_source
from depthbench.calibration.strategy import ActivationStrategy
from depthbench import atomic
from depthbench.errors import ConfigError, NumericalError
from depthbench.measure import StageTimer
from depthbench.paths import RunPaths, run_paths
from depthbench.provenance import provenance
from depthbench.settings import without_added_defaults
from depthbench.evaluation.result_cache import base_evaluation_material, cached_result
from depthbench.evaluation.perplexity import heldout_windows
from depthbench.evaluation.retention import retention_report
from depthbench.evaluation.fidelity import reference_perplexity
from depthbench.evaluation.suite import (check_evaluation, dense_copy, fidelity_enabled, fidelity_reference,
                                         has_benchmark, quality, speed)
from depthbench.experiments import layerwise_run
from depthbench.settings import CacheSettings
from depthbench.experiments.resume import RESULT_FILE, config_hash, find_finished, remove_stale_temporaries
from depthbench.experiments.tracking import build_tracker
from depthbench.healing.pruned_cache import cached_pruned_metrics
from depthbench.healing.settings import check_healing
from depthbench.healing.step import NO_HEALING, heal_model, healed_metrics, prepare as prepare_healing
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.loading import (
    check_model_reference, load_model, load_tokenizer, model_fingerprint, num_layers_of,
    resolve_dtype,
)
from depthbench.modeling.saving import save_pruned
from depthbench.pruners import build_pruner

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
    pruner = build_pruner(cfg.pruner.name, OmegaConf.to_container(options, resolve=True) if options else {},
                          **{key: cfg.pruner.get(key) for key in ("compensate", "compensate_mode", "compensate_fold")
                             if cfg.pruner.get(key) is not None})
    c = cfg.calibration
    validate_sizes(c.n_samples, c.seq_len, c.batch_size)
    pruner.check_calibration(c.n_samples, c.seq_len)
    build_source(c).check()
    if cfg.evaluate:
        check_evaluation(cfg.evaluation, cfg.efficiency)
    check_model_reference(cfg.model)
    if layerwise_run.enabled(cfg):
        layerwise_run.check(cfg, pruner)
    num_layers = num_layers_of(cfg.model, run_paths(cfg).models_dir)  # config.json or the GGUF header: no weights
    if num_layers is not None:
        pruner.check_feasible(num_layers, layers_to_remove(ratio, num_layers))
    if cfg.evaluate and has_benchmark(cfg.benchmark):
        from depthbench.evaluation.lm_eval_runner import check_tasks, parse_benchmark

        parse_benchmark(cfg.benchmark)
        if not cfg.benchmark.get("offline"):
            check_tasks(cfg.benchmark)  # builds lm-eval's task index: seconds, still before any weights
    check_healing(cfg)  # options, and target modules against the family from config.json / the GGUF header
    CacheSettings.from_config(cfg.cache)
    tracker = build_tracker(cfg.logger)
    _check_writable(output_dir)
    return ratio, pruner, tracker


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {str(directory)!r} is not writable: {err.strerror}") from err


def statistics_dir(cfg: DictConfig, sweep_dir: Path | None) -> Path:
    """Where calibration statistics and stored activations are cached (`depthbench.paths.RunPaths`)."""
    return run_paths(cfg).statistics_dir(sweep_dir)


def base_result_material(cfg: DictConfig, fingerprint: str) -> dict:
    """What the base model's quality numbers depend on: the weights, the benchmark, the held-out text."""
    benchmark = without_added_defaults(OmegaConf.to_container(cfg.benchmark, resolve=True), ("benchmark",))
    return base_evaluation_material(fingerprint, cfg.model.get("revision"), cfg.model.dtype, benchmark,
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
    """Stop before anything is saved if pruning produced a NaN/Inf weight (of those in memory: a layer-wise
    prune leaves the layers it did not change on the checkpoint, where they are the original weights)."""
    bad = [name for name, p in model.named_parameters() if p.device.type != "meta" and not torch.isfinite(p).all()]
    if bad:
        raise NumericalError(f"non-finite weights after pruning in {', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}; nothing was saved")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@dataclass
class Cell:
    """One grid cell as its steps see it: the config, where it writes, and what earlier steps produced."""

    cfg: DictConfig
    output_dir: Path
    sweep_dir: Path | None = None
    group: str = "single"
    name: str | None = None
    timer: StageTimer = field(default_factory=StageTimer)
    started: float = field(default_factory=time.time)
    ratio: float = 0.0
    pruner: Any = None
    tracker: Any = None
    digest: str = ""
    tokenizer: Any = None
    calibration: Any = None
    loaded: Any = None
    adapter: Any = None
    n_remove: int = 0
    fingerprint: str = ""
    windows: Any = None
    metrics: dict = field(default_factory=dict)
    reference: Any = None
    dense: Any = None
    dense_bytes: int = 0
    result: Any = None
    weights: Any = None  # depthbench.modeling.layerwise.LayerwiseModel of a layer-wise run, else None
    model_dir: Path | None = None
    healing_plan: Any = None  # depthbench.healing.step.HealingPlan, None for healing=none
    healing: dict = field(default_factory=lambda: dict(NO_HEALING))
    activations: dict = field(default_factory=dict)  # which activation strategy ran and why (`prune`)

    @property
    def progress(self) -> bool:
        return bool(self.cfg.progress)

    @cached_property
    def cache(self) -> CacheSettings:
        return CacheSettings.from_config(self.cfg.cache)

    @property
    def paths(self) -> RunPaths:
        return run_paths(self.cfg)

    @property
    def caches(self) -> Path:
        """Calibration statistics and base-model results shared with other cells."""
        return self.paths.shared_cache(self.sweep_dir)

    @property
    def shares_base_results(self) -> bool:
        return self.cache.base_results

    @cached_property
    def outcome(self) -> dict:
        """What ``pruning.json`` and ``result.json`` both carry, computed once (after the prune): the
        pruning record, the calibration summary, the resolved config and the provenance."""
        c = self.calibration
        return {"pruning": self.result.to_dict(),
                "calibration": {"description": c.description, "n_samples": c.n_samples, "n_tokens": c.n_tokens,
                                "seq_len": c.seq_len, "activations": self.activations},
                "config": OmegaConf.to_container(self.cfg, resolve=True), "provenance": provenance()}


def run(cfg: DictConfig, output_dir: str | Path, sweep_dir: str | Path | None = None,
        group: str = "single", name: str | None = None, after_prune=None) -> dict:
    """Run one cell as a sequence of named steps. With ``resume``, a finished record with the same config
    hash in ``output_dir`` or anywhere under ``sweep_dir`` is returned as it is (marked ``resumed``) and
    nothing is redone. ``after_prune(model, tokenizer)``, if given, sees the pruned model in memory
    before it is saved."""
    cell = Cell(cfg, Path(output_dir), Path(sweep_dir) if sweep_dir else None, group, name)
    check_config(cell)
    finished = finished_record(cell)
    if finished is not None:
        return finished
    remove_stale_temporaries(cell.output_dir)
    load_calibration_data(cell)
    load_weights(cell)
    if cfg.evaluate:
        evaluate_base(cell)
    prune(cell)
    if cfg.evaluate:
        evaluate_pruned(cell)
    heal(cell)
    check_finite_parameters(cell.loaded.model)
    if after_prune is not None:
        after_prune(cell.loaded.model, cell.loaded.tokenizer)
    if cfg.save_model:
        save_model(cell)
    return write_record(cell)


def check_config(cell: Cell) -> None:
    """Every check that needs no weights (`validate`), then ``model.dtype=auto`` made concrete and the
    config hash taken: the dtype is resolved before anything keys on the config (resume hash, caches, the
    record), so runs in different dtypes are never mixed up."""
    cfg = cell.cfg
    cell.ratio, cell.pruner, cell.tracker = validate(cfg, cell.output_dir)
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, "cuda" if cfg.model.get("device_map") else
                                    resolve_device(cfg.device))
    cell.digest = config_hash(cfg)


def finished_record(cell: Cell) -> dict | None:
    """The finished record of this cell (``resume``), marked ``resumed``; ``None`` when it must run."""
    if not cell.cfg.resume:
        return None
    finished = find_finished(cell.output_dir, cell.digest, cell.sweep_dir)
    if finished is None:
        return None
    log.info("cell %s already finished; nothing to do", cell.digest)
    return {**finished, "resumed": True}


def load_calibration_data(cell: Cell) -> None:
    """The tokenizer alone, then the calibration text: text that is empty, too short or not UTF-8 fails
    before any weights are read (or the packaged GGUF is converted)."""
    with cell.timer.stage("calibration_data"):
        cell.tokenizer = load_tokenizer(cell.cfg.model, cell.paths.models_dir)
        cell.calibration = load_calibration(cell.cfg.calibration, cell.tokenizer)
    if (cell.cfg.get("healing") or {}).get("name", "none") != "none":
        with cell.timer.stage("healing_data"):  # a budget larger than the text fails here, before weights
            cell.healing_plan = prepare_healing(cell.cfg, cell.tokenizer)


def load_weights(cell: Cell) -> None:
    """The model, its adapter, and the number of layers to remove (checked against the real depth)."""
    cfg = cell.cfg
    with cell.timer.stage("load"):
        if layerwise_run.enabled(cfg):  # the skeleton: embeddings and final norm in memory, layers on disk
            cell.weights, cell.loaded = layerwise_run.load(cfg, cell.tokenizer, resolve_device(cfg.device))
        else:
            cell.loaded = load_model(cfg.model, device=None if cfg.model.get("device_map") else
                                     resolve_device(cfg.device), tokenizer=cell.tokenizer,
                                     models_dir=cell.paths.models_dir)
    cell.adapter = adapter_for(cell.loaded.model)
    cell.pruner.check_model(cell.adapter)
    if cell.weights is not None:
        cell.pruner.check_layerwise(cell.adapter)
    cell.n_remove = layers_to_remove(cell.ratio, cell.adapter.num_layers)
    cell.pruner.check_feasible(cell.adapter.num_layers, cell.n_remove)
    cell.fingerprint = model_fingerprint(cell.loaded, cfg.model)


def evaluate_base(cell: Cell) -> None:
    """The dense model's quality (shared across a sweep's cells through the result cache), its
    fidelity reference, and a copy of it for the interleaved speed measurement (pruning edits in place)."""
    cfg, loaded, timer = cell.cfg, cell.loaded, cell.timer
    material = base_result_material(cfg, cell.fingerprint)
    with timer.stage("evaluation_data"):
        cell.windows = heldout_windows(cfg.evaluation.perplexity, loaded.tokenizer)
    if fidelity_enabled(cfg.evaluation):  # first: its pass also gives the dense held-out perplexity
        with timer.stage("fidelity_reference"):
            cell.reference, _ = fidelity_reference(
                loaded.model, cell.windows, cfg.evaluation, cell.caches if cell.shares_base_results else None,
                material, cell.progress, stale_after_s=cell.cache.lock_stale_s)
    with timer.stage("evaluate_base"):
        def compute():
            heldout = None if cell.reference is None else reference_perplexity(cell.reference)
            return quality(loaded.model, loaded.tokenizer, cell.windows, cfg.benchmark, cell.paths.data_dir,
                           cell.progress, "base", heldout=heldout)[0]

        if cell.shares_base_results:
            cell.metrics["base"], hit = cached_result(cell.caches, material, compute, "the base model's evaluation",
                                                      stale_after_s=cell.cache.lock_stale_s)
            cell.metrics["base_from_cache"] = hit
        else:
            cell.metrics["base"] = compute()
    if cfg.efficiency.enabled or needs_teacher(cell):
        with timer.stage("dense_copy"):
            cell.dense, cell.dense_bytes = dense_copy(loaded.model)


def prune(cell: Cell) -> None:
    """The method's stages over a calibration service with the run's caching: statistics cached per
    model x calibration data; stored activations kept where the caches are the user's own choice (a
    sweep's directory or an explicit ``cache.dir``), in a temporary directory for a single run; whether
    they are stored at all is ``cache.activation_strategy`` (a kept store serves any number of later
    runs, a temporary one this run's fit only), recorded in ``calibration.activations``."""
    if needs_teacher(cell) and cell.dense is None:  # the distillation teacher (evaluate=false made none)
        with cell.timer.stage("dense_copy"):
            cell.dense, cell.dense_bytes = dense_copy(cell.loaded.model)
    if cell.weights is not None:  # one layer at a time from the checkpoint: no cache, no activation store
        from depthbench.calibration.layerwise import open_layerwise_service

        with open_layerwise_service(cell.weights, cell.calibration, buffer_bytes=layerwise_run.buffer_bytes(cell.cfg),
                                    progress=cell.progress, label=cell.pruner.name) as service:
            cell.result = cell.pruner.prune(cell.adapter, service, cell.n_remove)
        cell.timer.add(cell.result.stages, prefix="prune.")
        return
    statistics = cell.paths.statistics_dir(cell.sweep_dir)
    stats_cache = (StatisticsCache(statistics, cell.fingerprint, cell.cache.lock_stale_s)
                   if cell.cache.statistics else None)
    keep = cell.sweep_dir is not None or bool(cell.cache.dir)
    store_dir = statistics if keep and stats_cache is not None else None
    budget = cell.cache.activation_budget(store_dir)
    strategy = ActivationStrategy(cell.cache.activation_strategy, fits=None if store_dir is not None else 1)
    with cell.pruner.service(cell.adapter, cell.calibration, cache=stats_cache, keep_activations=keep,
                             progress=cell.progress, activation_budget_bytes=budget, strategy=strategy) as service:
        cell.result = cell.pruner.prune(cell.adapter, service, cell.n_remove)
    cell.activations = strategy.record()
    cell.timer.add(cell.result.stages, prefix="prune.")


def evaluate_pruned(cell: Cell) -> None:
    """The pruned model's quality, its fidelity to the dense model, the interleaved speed-up, and the
    comparison with the base numbers."""
    cfg, loaded, timer, metrics = cell.cfg, cell.loaded, cell.timer, cell.metrics

    def compute() -> dict:
        with timer.stage("evaluate_pruned"):  # perplexity and fidelity from one pass over the held-out windows
            pruned, fidelity = quality(loaded.model, loaded.tokenizer, cell.windows, cfg.benchmark,
                                       cell.paths.data_dir, cell.progress, "pruned", cell.reference, metrics["base"])
        return {"pruned": pruned} if fidelity is None else {"pruned": pruned, "fidelity": fidelity}

    # once per pruned model: every healing budget of a sweep reuses it (keyed by the config without healing)
    pruned_only, metrics["pruned_from_cache"] = cached_pruned_metrics(
        cell.caches if cell.shares_base_results else None, cfg, loaded.model, compute,
        stale_after_s=cell.cache.lock_stale_s)
    metrics.update(pruned_only)
    speeds = None
    if cell.dense is not None and cfg.efficiency.enabled:
        with timer.stage("speed"):
            speeds = speed(cell.dense, loaded.model, loaded.tokenizer, cfg.efficiency)
            speeds["dense_copy_bytes"] = cell.dense_bytes
    if not needs_teacher(cell):
        cell.dense = None
    metrics.update(compare(metrics["base"], metrics["pruned"], speeds))


def needs_teacher(cell: Cell) -> bool:
    """LoRA healing with distillation needs the dense model's logits: the dense copy is kept for it."""
    return cell.healing_plan is not None and cell.healing_plan.needs_dense_model


def heal(cell: Cell) -> None:
    """``healing=lora``: LoRA on the kept layers, trained and merged in place; ``healing=partial_layers``: the
    pruned model's last layers, final norm and head fine-tuned in place (the pruned-only numbers are already
    in ``metrics.pruned``); the healed model's numbers go to ``metrics.healed``."""
    if cell.healing_plan is None:
        return
    cfg, loaded = cell.cfg, cell.loaded
    with cell.timer.stage("heal"):
        cell.healing = heal_model(cell.healing_plan, loaded.model, cell.adapter, cell.dense, cell.dense_bytes,
                                  cell.progress, removed_layers=cell.result.removed_layers)
    cell.dense = None
    if cfg.evaluate:
        with cell.timer.stage("evaluate_healed"):
            cell.metrics["healed"] = healed_metrics(loaded.model, loaded.tokenizer, cell.windows, cfg.benchmark,
                                                    cell.paths.data_dir, cell.reference, cell.metrics["base"],
                                                    cell.progress)


def save_model(cell: Cell) -> None:
    """``pruned_model/`` with its ``pruning.json`` (written atomically)."""
    loaded = cell.loaded
    with cell.timer.stage("save"):
        metadata = {
            "schema_version": SCHEMA_VERSION,
            "config_hash": cell.digest,
            "base_model": {"name": loaded.name, "source": loaded.source},
            "ratio": cell.ratio,
            **cell.outcome["pruning"],
            "healing": cell.healing,
            "calibration": cell.outcome["calibration"],
            "seed": cell.cfg.seed,
            "config": cell.outcome["config"],
            "provenance": cell.outcome["provenance"],
        }
        if cell.weights is not None:  # shard by shard, unchanged tensors copied from the checkpoint
            cell.model_dir = cell.weights.save(cell.output_dir / MODEL_DIR, loaded.tokenizer, metadata,
                                               progress=cell.progress)
        else:
            cell.model_dir = save_pruned(loaded.model, loaded.tokenizer, cell.output_dir / MODEL_DIR, metadata)


def write_record(cell: Cell) -> dict:
    """``result.json`` (atomically), then the tracker (W&B); returns the record."""
    cfg, loaded = cell.cfg, cell.loaded
    record = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": cell.digest,
        "model": {"name": loaded.name, "source": loaded.source, "dtype": cfg.model.dtype},
        "method": cell.pruner.name,
        "ratio": cell.ratio,
        "seed": cfg.seed,
        "pruning": cell.outcome["pruning"],
        "healing": cell.healing,
        "calibration": cell.outcome["calibration"],
        "metrics": cell.metrics,
        "stages": cell.timer.to_dict(),
        "wall_seconds": round(time.time() - cell.started, 3),
        "pruned_model_dir": str(cell.model_dir) if cell.model_dir else None,
        "config": cell.outcome["config"],
        "provenance": cell.outcome["provenance"],
    }
    atomic.write_json(cell.output_dir / RESULT_FILE, record)
    cell.tracker.log_run(record, cell.output_dir, group=cell.group,
                         name=cell.name or f"{cell.pruner.name}-r{cell.ratio}-{cell.digest[:6]}")
    return record

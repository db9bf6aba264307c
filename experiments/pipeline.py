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
from depthbench.calibration.memory_store import memory_budget
from depthbench.calibration.strategy import ActivationStrategy
from depthbench import atomic
from depthbench.allocator import keep_freed_memory
from depthbench.errors import ConfigError, NumericalError
from depthbench.measure import StageTimer
from depthbench.paths import RunPaths, run_paths
from depthbench.provenance import provenance
from depthbench.settings import check_declared_keys, without_added_defaults
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
    check_declared_keys(cfg)
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


@dataclass(frozen=True)
class RunContext:
    """What every step of one cell reads and no step changes: the concrete config (``model.dtype`` resolved),
    where the cell writes, and the stage timer the steps measure into."""

    cfg: DictConfig
    output_dir: Path
    sweep_dir: Path | None = None
    group: str = "single"
    name: str | None = None
    timer: StageTimer = field(default_factory=StageTimer)
    started: float = field(default_factory=time.time)

    @property
    def progress(self) -> bool:
        return bool(self.cfg.progress)

    @cached_property
    def cache(self) -> CacheSettings:
        return CacheSettings.from_config(self.cfg.cache)

    @cached_property
    def paths(self) -> RunPaths:
        return run_paths(self.cfg)

    @property
    def caches(self) -> Path | None:
        """Where base-model and pruned-model results are shared with other cells; None when they are not."""
        return self.paths.shared_cache(self.sweep_dir) if self.cache.base_results else None


@dataclass(frozen=True)
class CheckedRun:
    """`check_config`'s result: the validated ratio, the pruner built from its options, the tracker, the
    config hash that names the cell (resume, caches, the record)."""

    ratio: float
    pruner: Any  # depthbench.pruners.base.Pruner
    tracker: Any  # depthbench.experiments.tracking tracker
    digest: str


@dataclass(frozen=True)
class RunInputs:
    """`load_calibration_data`'s result: what is read before any weights."""

    tokenizer: Any
    calibration: Any  # depthbench.calibration.batches.CalibrationData
    healing_plan: Any = None  # depthbench.healing.step.HealingPlan; None for healing=none

    @property
    def needs_teacher(self) -> bool:
        """LoRA healing with distillation needs the dense model's logits: a dense copy is kept for it."""
        return self.healing_plan is not None and self.healing_plan.needs_dense_model


@dataclass(frozen=True)
class LoadedRun:
    """`load_weights`' result: the model (edited in place by the prune), its adapter, the number of layers to
    remove and the weights' fingerprint; ``layerwise`` is the `LayerwiseModel` of a layer-wise run, else None."""

    loaded: Any  # depthbench.modeling.loading.LoadedModel
    adapter: Any
    n_remove: int
    fingerprint: str
    layerwise: Any = None


@dataclass(frozen=True)
class BaseEvaluation:
    """`evaluate_base`'s result: the held-out windows, the dense model's fidelity reference and its metrics
    (``base``, ``base_from_cache``)."""

    windows: Any
    reference: Any
    metrics: dict


@dataclass(frozen=True)
class DenseCopy:
    """A copy of the dense model (the interleaved speed measurement, the distillation teacher)."""

    model: Any
    bytes: int


@dataclass(frozen=True)
class PruneOutcome:
    """`prune`'s result: the pruner's record and which activation strategy ran and why."""

    result: Any  # depthbench.pruners.base.PruningResult
    activations: dict


@dataclass(frozen=True)
class HealOutcome:
    """`heal`'s result: the healing record and, when evaluated, the healed model's metrics."""

    record: dict
    metrics: dict | None = None


def run(cfg: DictConfig, output_dir: str | Path, sweep_dir: str | Path | None = None,
        group: str = "single", name: str | None = None, after_prune=None) -> dict:
    """Run one cell as a sequence of named steps, each taking the values it needs and returning what it
    produced. With ``resume``, a finished record with the same config hash in ``output_dir`` or anywhere
    under ``sweep_dir`` is returned as it is (marked ``resumed``) and nothing is redone. ``after_prune(model,
    tokenizer)``, if given, sees the pruned model in memory before it is saved."""
    keep_freed_memory()  # the C allocator reuses freed temporaries (depthbench.allocator); recorded in provenance
    ctx = RunContext(cfg, Path(output_dir), Path(sweep_dir) if sweep_dir else None, group, name)
    checked = check_config(ctx)
    finished = finished_record(ctx, checked)
    if finished is not None:
        return finished
    remove_stale_temporaries(ctx.output_dir)
    inputs = load_calibration_data(ctx)
    model = load_weights(ctx, checked, inputs)
    base = evaluate_base(ctx, model) if cfg.evaluate else None
    dense = keep_dense_copy(ctx, model) if (base is not None and cfg.efficiency.enabled) or inputs.needs_teacher \
        else None
    pruned = prune(ctx, checked, inputs, model)
    metrics = dict(base.metrics) if base is not None else {}
    if base is not None:
        metrics.update(evaluate_pruned(ctx, model, base, dense))
    if not inputs.needs_teacher:
        dense = None  # freed before healing and saving
    healed = heal(ctx, inputs, model, base, dense, pruned.result.removed_layers)
    dense = None
    if healed.metrics is not None:
        metrics["healed"] = healed.metrics
    check_finite_parameters(model.loaded.model)
    if after_prune is not None:
        after_prune(model.loaded.model, model.loaded.tokenizer)
    outcome = run_outcome(ctx, inputs, pruned)
    model_dir = save_model(ctx, checked, model, outcome, healed.record) if cfg.save_model else None
    return write_record(ctx, checked, model, outcome, healed.record, metrics, model_dir)


def check_config(ctx: RunContext) -> CheckedRun:
    """Every check that needs no weights (`validate`), then ``model.dtype=auto`` made concrete and the
    config hash taken: the dtype is resolved before anything keys on the config (resume hash, caches, the
    record), so runs in different dtypes are never mixed up. The config is the cell's own (Hydra composes one
    per cell): its ``model.dtype`` is written back, so the record's config names the dtype that ran."""
    cfg = ctx.cfg
    ratio, pruner, tracker = validate(cfg, ctx.output_dir)
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, "cuda" if cfg.model.get("device_map") else
                                    resolve_device(cfg.device))
    return CheckedRun(ratio, pruner, tracker, config_hash(cfg))


def finished_record(ctx: RunContext, checked: CheckedRun) -> dict | None:
    """The finished record of this cell (``resume``), marked ``resumed``; ``None`` when it must run."""
    if not ctx.cfg.resume:
        return None
    finished = find_finished(ctx.output_dir, checked.digest, ctx.sweep_dir)
    if finished is None:
        return None
    log.info("cell %s already finished; nothing to do", checked.digest)
    return {**finished, "resumed": True}


def load_calibration_data(ctx: RunContext) -> RunInputs:
    """The tokenizer alone, then the calibration text: text that is empty, too short or not UTF-8 fails
    before any weights are read (or the packaged GGUF is converted)."""
    with ctx.timer.stage("calibration_data"):
        tokenizer = load_tokenizer(ctx.cfg.model, ctx.paths.models_dir)
        calibration = load_calibration(ctx.cfg.calibration, tokenizer)
    healing_plan = None
    if (ctx.cfg.get("healing") or {}).get("name", "none") != "none":
        with ctx.timer.stage("healing_data"):  # a budget larger than the text fails here, before weights
            healing_plan = prepare_healing(ctx.cfg, tokenizer)
    return RunInputs(tokenizer, calibration, healing_plan)


def load_weights(ctx: RunContext, checked: CheckedRun, inputs: RunInputs) -> LoadedRun:
    """The model, its adapter, and the number of layers to remove (checked against the real depth)."""
    cfg, pruner = ctx.cfg, checked.pruner
    layerwise = None
    with ctx.timer.stage("load"):
        if layerwise_run.enabled(cfg):  # the skeleton: embeddings and final norm in memory, layers on disk
            layerwise, loaded = layerwise_run.load(cfg, inputs.tokenizer, resolve_device(cfg.device))
        else:
            loaded = load_model(cfg.model, device=None if cfg.model.get("device_map") else
                                resolve_device(cfg.device), tokenizer=inputs.tokenizer,
                                models_dir=ctx.paths.models_dir)
    adapter = adapter_for(loaded.model)
    pruner.check_model(adapter)
    if layerwise is not None:
        pruner.check_layerwise(adapter)
    n_remove = layers_to_remove(checked.ratio, adapter.num_layers)
    pruner.check_feasible(adapter.num_layers, n_remove)
    return LoadedRun(loaded, adapter, n_remove, model_fingerprint(loaded, cfg.model), layerwise)


def evaluate_base(ctx: RunContext, model: LoadedRun) -> BaseEvaluation:
    """The dense model's quality (shared across a sweep's cells through the result cache) and its
    fidelity reference."""
    cfg, loaded, timer = ctx.cfg, model.loaded, ctx.timer
    material = base_result_material(cfg, model.fingerprint)
    with timer.stage("evaluation_data"):
        windows = heldout_windows(cfg.evaluation.perplexity, loaded.tokenizer)
    reference = None
    if fidelity_enabled(cfg.evaluation):  # first: its pass also gives the dense held-out perplexity
        with timer.stage("fidelity_reference"):
            reference, _ = fidelity_reference(loaded.model, windows, cfg.evaluation, ctx.caches, material,
                                              ctx.progress, stale_after_s=ctx.cache.lock_stale_s)
    with timer.stage("evaluate_base"):
        def compute():
            heldout = None if reference is None else reference_perplexity(reference)
            return quality(loaded.model, loaded.tokenizer, windows, cfg.benchmark, ctx.paths.data_dir,
                           ctx.progress, "base", heldout=heldout)[0]

        if ctx.caches is not None:
            base, hit = cached_result(ctx.caches, material, compute, "the base model's evaluation",
                                      stale_after_s=ctx.cache.lock_stale_s)
            metrics = {"base": base, "base_from_cache": hit}
        else:
            metrics = {"base": compute()}
    return BaseEvaluation(windows, reference, metrics)


def keep_dense_copy(ctx: RunContext, model: LoadedRun) -> DenseCopy:
    """A copy of the dense model before the prune edits it in place: for the interleaved speed measurement
    and as the distillation teacher of LoRA healing."""
    with ctx.timer.stage("dense_copy"):
        return DenseCopy(*dense_copy(model.loaded.model))


def prune(ctx: RunContext, checked: CheckedRun, inputs: RunInputs, model: LoadedRun) -> PruneOutcome:
    """The method's stages over a calibration service with the run's caching: statistics cached per
    model x calibration data; stored activations kept where the caches are the user's own choice (a
    sweep's directory or an explicit ``cache.dir``); a single run's in memory where they fit
    ``cache.activations_memory_gb``, else in a temporary directory; whether
    they are stored at all is ``cache.activation_strategy`` (a kept store serves any number of later
    runs, a temporary one this run's fit only), recorded in ``calibration.activations``. What a store in memory
    leaves of ``cache.activations_memory_gb`` holds the methods' training rows (a sweep's cells too)."""
    pruner, calibration = checked.pruner, inputs.calibration
    if model.layerwise is not None:  # one layer at a time from the checkpoint: no cache, no activation store
        from depthbench.calibration.layerwise import open_layerwise_service

        with open_layerwise_service(model.layerwise, calibration, buffer_bytes=layerwise_run.buffer_bytes(ctx.cfg),
                                    progress=ctx.progress, label=pruner.name) as service:
            result = pruner.prune(model.adapter, service, model.n_remove)
        ctx.timer.add(result.stages, prefix="prune.")
        return PruneOutcome(result, {})
    settings = ctx.cache
    statistics = ctx.paths.statistics_dir(ctx.sweep_dir)
    stats_cache = (StatisticsCache(statistics, model.fingerprint, settings.lock_stale_s)
                   if settings.statistics else None)
    keep = ctx.sweep_dir is not None or bool(settings.dir)
    store_dir = statistics if keep and stats_cache is not None else None
    strategy = ActivationStrategy(settings.activation_strategy, fits=None if store_dir is not None else 1)
    memory = memory_budget(settings.activations_memory_gb, model.adapter.embeddings().weight.device)
    with pruner.service(model.adapter, calibration, cache=stats_cache, keep_activations=keep,
                        progress=ctx.progress, activation_budget_bytes=settings.activation_budget(store_dir),
                        strategy=strategy, memory_budget_bytes=memory) as service:
        result = pruner.prune(model.adapter, service, model.n_remove)
    ctx.timer.add(result.stages, prefix="prune.")
    return PruneOutcome(result, strategy.record())


def evaluate_pruned(ctx: RunContext, model: LoadedRun, base: BaseEvaluation, dense: DenseCopy | None) -> dict:
    """The pruned model's quality, its fidelity to the dense model, the interleaved speed-up, and the
    comparison with the base numbers: the metrics beside ``base``."""
    cfg, loaded, timer = ctx.cfg, model.loaded, ctx.timer

    def compute() -> dict:
        with timer.stage("evaluate_pruned"):  # perplexity and fidelity from one pass over the held-out windows
            pruned, fidelity = quality(loaded.model, loaded.tokenizer, base.windows, cfg.benchmark,
                                       ctx.paths.data_dir, ctx.progress, "pruned", base.reference,
                                       base.metrics["base"])
        return {"pruned": pruned} if fidelity is None else {"pruned": pruned, "fidelity": fidelity}

    # once per pruned model: every healing budget of a sweep reuses it (keyed by the config without healing)
    pruned_only, from_cache = cached_pruned_metrics(ctx.caches, cfg, loaded.model, compute,
                                                    stale_after_s=ctx.cache.lock_stale_s)
    metrics = {"pruned_from_cache": from_cache, **pruned_only}
    speeds = None
    if dense is not None and cfg.efficiency.enabled:
        with timer.stage("speed"):
            speeds = speed(dense.model, loaded.model, loaded.tokenizer, cfg.efficiency)
            speeds["dense_copy_bytes"] = dense.bytes
    metrics.update(compare(base.metrics["base"], metrics["pruned"], speeds))
    return metrics


def heal(ctx: RunContext, inputs: RunInputs, model: LoadedRun, base: BaseEvaluation | None,
         dense: DenseCopy | None, removed_layers) -> HealOutcome:
    """``healing=lora``: LoRA on the kept layers, trained and merged in place; ``healing=partial_layers``: the
    pruned model's last layers, final norm and head fine-tuned in place (the pruned-only numbers are already
    in ``metrics.pruned``); with an evaluation, the healed model's numbers (``metrics.healed``)."""
    plan = inputs.healing_plan
    if plan is None:
        return HealOutcome(dict(NO_HEALING))
    loaded = model.loaded
    with ctx.timer.stage("heal"):
        record = heal_model(plan, loaded.model, model.adapter, None if dense is None else dense.model,
                            0 if dense is None else dense.bytes, ctx.progress, removed_layers=removed_layers)
    if base is None:
        return HealOutcome(record)
    with ctx.timer.stage("evaluate_healed"):
        metrics = healed_metrics(loaded.model, loaded.tokenizer, base.windows, ctx.cfg.benchmark, ctx.paths.data_dir,
                                 base.reference, base.metrics["base"], ctx.progress)
    return HealOutcome(record, metrics)


def run_outcome(ctx: RunContext, inputs: RunInputs, pruned: PruneOutcome) -> dict:
    """What ``pruning.json`` and ``result.json`` both carry: the pruning record, the calibration summary, the
    resolved config and the provenance."""
    c = inputs.calibration
    return {"pruning": pruned.result.to_dict(),
            "calibration": {"description": c.description, "n_samples": c.n_samples, "n_tokens": c.n_tokens,
                            "seq_len": c.seq_len, "activations": pruned.activations},
            "config": OmegaConf.to_container(ctx.cfg, resolve=True), "provenance": provenance()}


def save_model(ctx: RunContext, checked: CheckedRun, model: LoadedRun, outcome: dict, healing: dict) -> Path:
    """``pruned_model/`` with its ``pruning.json`` (written atomically); returns the directory."""
    loaded = model.loaded
    with ctx.timer.stage("save"):
        metadata = {
            "schema_version": SCHEMA_VERSION,
            "config_hash": checked.digest,
            "base_model": {"name": loaded.name, "source": loaded.source},
            "ratio": checked.ratio,
            **outcome["pruning"],
            "healing": healing,
            "calibration": outcome["calibration"],
            "seed": ctx.cfg.seed,
            "config": outcome["config"],
            "provenance": outcome["provenance"],
        }
        if model.layerwise is not None:  # shard by shard, unchanged tensors copied from the checkpoint
            return model.layerwise.save(ctx.output_dir / MODEL_DIR, loaded.tokenizer, metadata,
                                        progress=ctx.progress)
        return save_pruned(loaded.model, loaded.tokenizer, ctx.output_dir / MODEL_DIR, metadata)


def write_record(ctx: RunContext, checked: CheckedRun, model: LoadedRun, outcome: dict, healing: dict,
                 metrics: dict, model_dir: Path | None) -> dict:
    """``result.json`` (atomically), then the tracker (W&B); returns the record."""
    cfg, loaded = ctx.cfg, model.loaded
    record = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": checked.digest,
        "model": {"name": loaded.name, "source": loaded.source, "dtype": cfg.model.dtype},
        "method": checked.pruner.name,
        "ratio": checked.ratio,
        "seed": cfg.seed,
        "pruning": outcome["pruning"],
        "healing": healing,
        "calibration": outcome["calibration"],
        "metrics": metrics,
        "stages": ctx.timer.to_dict(),
        "wall_seconds": round(time.time() - ctx.started, 3),
        "pruned_model_dir": str(model_dir) if model_dir else None,
        "config": outcome["config"],
        "provenance": outcome["provenance"],
    }
    atomic.write_json(ctx.output_dir / RESULT_FILE, record)
    checked.tracker.log_run(record, ctx.output_dir, group=ctx.group,
                            name=ctx.name or f"{checked.pruner.name}-r{checked.ratio}-{checked.digest[:6]}")
    return record

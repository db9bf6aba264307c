"""The `Pruner` interface: explicit stages (score, select, fit a replacement, apply) and a result.

A method says which calibration statistics of the original model it needs (`statistics`), turns
them into a `Selection` (`select`), optionally fits something that stands in for the removed layers
(`fit`), and changes the model through its adapter (`apply`). `Pruner.prune` runs those stages with
timing and peak memory and returns a `PruneResult`.

A pruner is stateless: its options are fixed at construction and every stage receives what it needs,
the adapter and a `depthbench.calibration.service.CalibrationService` that answers "statistics of the
original model" (cached, one pass per sweep), "statistics / NLL of the current model with these units
skipped" and "a scratch directory". Caching and activation storage are the service's business,
wrapped around the pruner by whoever builds the service (the pipeline, a benchmark, a test).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, ClassVar

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.service import DEFAULT_ACTIVATION_BUDGET, CalibrationService, open_service
from depthbench.calibration.statistics import Statistic
from depthbench.errors import ConfigError
from depthbench.measure import StageTimer
from depthbench.modeling.adapters import ModelAdapter
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.units import Unit, UnitLike, normalize_units
from depthbench.pruners.options import parse_options
from depthbench.registry import Registry
from depthbench.selection.blocks import Block

__all__ = ["DEFAULT_ACTIVATION_BUDGET", "Pruner", "PruneResult", "RemovalStage", "Selection", "pruner_registry"]


@dataclass
class Selection:
    """What to remove and why: the removed layers and sub-blocks (original 0-based numbering) and the scores.

    Layer methods fill ``removed_layers``; sub-block methods build it with `Selection.from_units`, which
    puts whole layers (both sub-blocks of a layer included) in ``removed_layers`` and the rest, as
    ``"K.attn"`` / ``"K.mlp"``, in ``removed_sub_blocks``.
    """

    removed_layers: list[int]
    blocks: list[Block] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)
    removed_sub_blocks: list[str] = field(default_factory=list)

    @classmethod
    def from_units(cls, units: Iterable[UnitLike], **fields: Any) -> "Selection":
        units = normalize_units(units)
        return cls(removed_layers=[u.layer for u in units if u.is_layer],
                   removed_sub_blocks=[str(u) for u in units if not u.is_layer], **fields)

    def units(self) -> list[Unit]:
        """Everything removed, as normalised units (original numbering)."""
        return normalize_units([*self.removed_layers, *self.removed_sub_blocks])

    def to_dict(self) -> dict:
        return {
            "removed_layers": list(self.removed_layers),
            "removed_sub_blocks": list(self.removed_sub_blocks),
            "blocks": [[b.start, b.end] for b in self.blocks],
            "scores": self.scores,
        }


@dataclass
class PruneResult:
    method: str
    options: dict
    num_layers_before: int
    num_layers_after: int
    selection: Selection
    replacement: dict | None
    parameters_before: dict
    parameters_after: dict
    stages: dict
    #: ``calibration_tokens``, ``training_tokens``, ``optimizer_steps``, ``epochs`` of this prune (0 where
    #: nothing is trained), from the replacement's ``budget`` where it has one.
    budget: dict = field(default_factory=dict)
    #: Prune&Comp's record (settings, alpha per gap or round; `depthbench.pruners.methods.compensation`), or None:
    #: what a `RemovalStage` that replaces select / fit / apply recorded.
    compensation: dict | None = None

    @property
    def removed_layers(self) -> list[int]:
        return self.selection.removed_layers

    def removed_modules(self) -> dict:
        """Attention and MLP modules removed (a whole layer counts once in each), layer-equivalents
        (removed decoder parameters / parameters of one original layer) and the fraction of the KV cache
        removed (attention modules removed / layers before)."""
        units = self.selection.units()
        attention = sum(1 for u in units if u.part in ("layer", "attention"))
        mlp = sum(1 for u in units if u.part in ("layer", "mlp"))
        removed_body = self.parameters_before["without_embeddings"] - self.parameters_after["without_embeddings"]
        return {"removed_attention_modules": attention, "removed_mlp_modules": mlp,
                "layer_equivalents_removed": removed_body / self.parameters_before["per_layer"],
                "kv_cache_fraction_removed": attention / self.num_layers_before}

    def to_dict(self) -> dict:
        removed_total = self.parameters_before["total"] - self.parameters_after["total"]
        removed_body = self.parameters_before["without_embeddings"] - self.parameters_after["without_embeddings"]
        return {
            "method": self.method,
            "options": self.options,
            "num_layers_before": self.num_layers_before,
            "num_layers_after": self.num_layers_after,
            **self.selection.to_dict(),
            **self.removed_modules(),
            "replacement": self.replacement,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "fraction_parameters_removed": removed_total / self.parameters_before["total"],
            "fraction_parameters_removed_without_embeddings":
                removed_body / self.parameters_before["without_embeddings"],
            "stages": self.stages,
            "budget": self.budget,
            "compensation": self.compensation,
        }


class Pruner(ABC):
    """Base class of every depth-pruning method.

    Subclasses set ``name`` and ``paper``, declare their options once as a dataclass ``Options`` whose
    fields carry type, default and documentation (`depthbench.pruners.options.option`; it is also the
    Hydra config entry ``pruner=<name>``), and implement `statistics` and `select`; methods that replace
    the removed layers also implement `fit` and `apply`. A pruner holds its options and nothing else.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        self.options = parse_options(self.name, self.Options, options)
        self.validate_options()

    def removes_sub_blocks(self) -> bool:
        """Whether this method (with its options) may remove attention / MLP sub-blocks rather than whole layers."""
        return False

    def replaces_layers(self) -> bool:
        """Whether the method puts something in place of the removed layers (its own `fit` / `apply`, or a fit
        that reads activations) rather than only removing them."""
        own = [stage for stage in ("fit", "apply") if getattr(type(self), stage) is not getattr(Pruner, stage)]
        return bool(own) or self.fit_reads_activations

    def validate_options(self) -> None:
        """Check option values; raise `ConfigError` naming the value and what is allowed."""

    def check_calibration(self, n_samples: int, seq_len: int) -> None:
        """Raise `ConfigError` if the method cannot work with this calibration size (checked from the config,
        before any weights are read)."""

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        """Raise `ConfigError` if removing ``n_remove`` of ``num_layers`` layers is impossible."""
        if not 1 <= n_remove < num_layers:
            raise ConfigError(f"cannot remove {n_remove} of {num_layers} layers: allowed 1..{num_layers - 1}")

    #: Whether `fit` reads calibration activations of the unmodified model (moments, token rows,
    #: training pairs). For such methods the service stores every layer's activations during the score
    #: pass and replays them in `fit` instead of running a second forward pass.
    fit_reads_activations: ClassVar[bool] = False

    #: False for methods that choose without the calibration data (position, a seeded draw): their
    #: ``budget`` then records 0 calibration tokens (unless Prune&Comp, which reads them, is on).
    uses_calibration: ClassVar[bool] = True

    def check_model(self, adapter: ModelAdapter) -> None:
        """Raise `ConfigError` if the method cannot prune this architecture (checked before calibration)."""

    #: Whether the method runs with ``model.layerwise=true`` (one decoder layer in memory at a time,
    #: `depthbench.calibration.layerwise`): it needs only statistics from single passes (of the original model,
    #: or of the model as pruned so far with nothing skipped), removes layers or sub-blocks, and changes or
    #: replaces no weight outside `layers_apply_changes`. Methods that re-score candidates or train through the
    #: model need the whole model in memory; options that do are refused by `check_layerwise_options`.
    supports_layerwise: ClassVar[bool] = False

    def layers_apply_changes(self, selection: Selection) -> list[int]:
        """The decoder layers (original numbering) whose weights `apply` changes: a layer-wise prune reads them
        into memory before `apply` (and refuses to save a change made anywhere else)."""
        return []

    def check_layerwise_options(self) -> None:
        """Raise `ConfigError` if this method's options need the whole model with ``model.layerwise=true``
        (checked from the config, before any weights are read; beyond `supports_layerwise`)."""

    def check_layerwise(self, adapter: ModelAdapter) -> None:
        """Raise `ConfigError` if this method cannot run layer-wise on this model (beyond `supports_layerwise`)."""

    # -- stages ----------------------------------------------------------------------------
    @abstractmethod
    def statistics(self, adapter: ModelAdapter, n_remove: int) -> list[Statistic]:
        """The calibration statistics of the original model the score stage needs (one shared pass)."""

    @abstractmethod
    def select(self, statistics: list[Statistic], adapter: ModelAdapter, n_remove: int,
               service: CalibrationService) -> Selection:
        """Which layers go, from the statistics (``service`` answers further questions, e.g. the NLL of
        the model with candidate units skipped, for iterative methods)."""

    def fit(self, adapter: ModelAdapter, selection: Selection, service: CalibrationService) -> Any:
        """Fit whatever replaces the removed layers; ``None`` when the method only removes."""
        return None

    def apply(self, adapter: ModelAdapter, selection: Selection, replacement: Any,
              service: CalibrationService) -> dict | None:
        """Change the model; return a JSON-able description of the replacement (or ``None``)."""
        ModelSurgery(adapter).remove_units(selection.units())
        return None

    # -- orchestration ---------------------------------------------------------------------
    def prune(self, adapter: ModelAdapter, calibration: CalibrationService | CalibrationData, n_remove: int,
              progress: bool = True) -> PruneResult:
        """Run the stages. ``calibration`` is a service (built by the caller with the caching it wants,
        e.g. `depthbench.calibration.service.open_service` with a statistics cache) or plain calibration
        data, for which a service without a cache is built for this call (stored activations in a
        temporary directory)."""
        self.check_model(adapter)
        self.check_feasible(adapter.num_layers, n_remove)
        if isinstance(calibration, CalibrationService):
            return self.run_stages(adapter, calibration, n_remove)
        with self.service(adapter, calibration, progress=progress) as service:
            return self.run_stages(adapter, service, n_remove)

    def service(self, adapter: ModelAdapter, calibration: CalibrationData, **caching):
        """The calibration service this method needs (every layer's activations stored for the fit iff it
        reads them), with the caller's caching: ``cache``, ``activation_budget_bytes``,
        ``keep_activations``, ``progress`` (see `depthbench.calibration.service.open_service`)."""
        return open_service(adapter, calibration, store_activations=self.fit_reads_activations, label=self.name,
                            **caching)

    def run_stages(self, adapter: ModelAdapter, service: CalibrationService, n_remove: int,
                   removal: "RemovalStage | None" = None) -> PruneResult:
        """score, then select / fit / apply, timed; ``removal`` replaces the last three (Prune&Comp removes and
        compensates in one stage, `depthbench.pruners.methods.compensation.CompensatedPruner`)."""
        num_layers = adapter.num_layers
        timer = StageTimer()
        params_before = adapter.parameter_counts()
        with timer.stage("score"):
            first = removal.first_request(n_remove) if removal is not None else n_remove
            stats = service.original(self.statistics(adapter, first), "calibration")
        record = None
        if removal is not None:
            replacement_info = None
            with timer.stage(removal.stage):
                selection, record = removal.remove(self, adapter, stats, n_remove, service)
        else:
            with timer.stage("select"):
                selection = self.select(stats, adapter, n_remove, service)
            with timer.stage("fit"):
                replacement = self.fit(adapter, selection, service)
            with timer.stage("apply"):
                service.before_apply(self.layers_apply_changes(selection))
                replacement_info = self.apply(adapter, selection, replacement, service)
        reads_calibration = self.uses_calibration or (removal is not None and removal.reads_calibration)
        return PruneResult(
            method=self.name,
            options=dataclasses.asdict(self.options),
            num_layers_before=num_layers,
            num_layers_after=adapter.num_layers,
            selection=selection,
            replacement=replacement_info,
            parameters_before=params_before,
            parameters_after=adapter.parameter_counts(),
            stages=timer.to_dict(),
            budget=prune_budget(service.calibration.n_tokens if reads_calibration else 0, replacement_info),
            compensation=record,
        )


class RemovalStage(ABC):
    """A stage that takes the place of select / fit / apply (a feature that wraps any layer method, such as
    Prune&Comp), named ``stage`` in the record's timings."""

    stage: ClassVar[str] = "remove"
    #: Whether it reads the calibration data (then the budget records its tokens even for a method that does not).
    reads_calibration: ClassVar[bool] = True

    def first_request(self, n_remove: int) -> int:
        """The ``n_remove`` the method's `Pruner.statistics` is first asked with."""
        return n_remove

    @abstractmethod
    def remove(self, pruner: Pruner, adapter: ModelAdapter, statistics: list[Statistic], n_remove: int,
               service: CalibrationService) -> tuple[Selection, dict]:
        """Change the model; return the selection (original numbering) and the stage's record."""


def prune_budget(calibration_tokens: int, replacement_info: dict | None) -> dict:
    """The ``budget`` of a prune: the calibration data's real tokens, and what the replacement trained
    (``replacement_info["budget"]``: training tokens, optimiser steps, epochs), zeros where nothing trains."""
    trained = (replacement_info or {}).get("budget") or {}
    return {"calibration_tokens": int(calibration_tokens),
            "training_tokens": int(trained.get("training_tokens", 0)),
            "optimizer_steps": int(trained.get("optimizer_steps", 0)),
            "epochs": float(trained.get("epochs", 0.0))}


#: The built-in methods' modules (`depthbench.pruners.methods`), imported by the registry on its first lookup; third
#: parties use the `depthbench.pruners` entry-point group instead (docs/PLUGINS.md).
BUILTIN_METHOD_MODULES = tuple(f"depthbench.pruners.methods.{name}" for name in (
    "uidl", "replaceme", "shortgpt", "llm_streamline", "sleb", "shortened_llama", "llm_drop", "blockpruner", "finercut",
    "baselines", "laco", "linearpatch", "mka"))
pruner_registry: Registry[type[Pruner]] = Registry("pruner", base=Pruner, entry_point_group="depthbench.pruners",
                                                    builtin_modules=BUILTIN_METHOD_MODULES)

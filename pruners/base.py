"""The `Pruner` interface: explicit stages (score, select, fit a replacement, apply) and a result.

A method says which calibration statistics it needs (`statistics`), turns them into a `Selection`
(`select`), optionally fits something that stands in for the removed layers (`fit`), and changes the
model through its adapter (`apply`). `Pruner.prune` runs those stages with timing and peak memory
and returns a `PruneResult`. The calibration pass itself is shared: several methods' statistics can
be collected in one forward pass (`depthbench.calibration.statistics.collect`), and methods whose fit reads
activations (`fit_reads_activations`) store every layer's activations during that pass and replay
them in `fit` (`depthbench.calibration.activations`): one forward pass per prune, and per sweep.
"""

from __future__ import annotations

import dataclasses
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from depthbench.calibration.activations import ActivationSlot
from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.cache import StatisticsCache, data_fingerprint, gather
from depthbench.calibration.statistics import Statistic
from depthbench.errors import ConfigError
from depthbench.measure import StageTimer
from depthbench.registry import Registry
from depthbench.modeling.adapters import ModelAdapter
from depthbench.selection.blocks import Block


#: Default cap on the disk space of one model's stored calibration activations.
DEFAULT_ACTIVATION_BUDGET = 4 * 1024**3


@dataclass
class Selection:
    """What to remove and why: the removed layers (original 0-based indices) and the scores."""

    removed_layers: list[int]
    blocks: list[Block] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "removed_layers": list(self.removed_layers),
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

    @property
    def removed_layers(self) -> list[int]:
        return self.selection.removed_layers

    def to_dict(self) -> dict:
        removed_total = self.parameters_before["total"] - self.parameters_after["total"]
        removed_body = self.parameters_before["without_embeddings"] - self.parameters_after["without_embeddings"]
        return {
            "method": self.method,
            "options": self.options,
            "num_layers_before": self.num_layers_before,
            "num_layers_after": self.num_layers_after,
            **self.selection.to_dict(),
            "replacement": self.replacement,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "fraction_parameters_removed": removed_total / self.parameters_before["total"],
            "fraction_parameters_removed_without_embeddings":
                removed_body / self.parameters_before["without_embeddings"],
            "stages": self.stages,
        }


class Pruner(ABC):
    """Base class of every depth-pruning method.

    Subclasses set ``name``, define their options as a dataclass ``Options`` (so unknown or mistyped
    options fail loudly) and implement `statistics` and `select`; methods that replace the removed
    layers also implement `fit` and `apply`.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for pruner {self.name!r}; "
                f"allowed: {', '.join(sorted(known)) or '(none)'}"
            )
        self.options = self.Options(**options)
        self.validate_options()

    def validate_options(self) -> None:
        """Check option values; raise `ConfigError` naming the value and what is allowed."""

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        """Raise `ConfigError` if removing ``n_remove`` of ``num_layers`` layers is impossible."""
        if not 1 <= n_remove < num_layers:
            raise ConfigError(f"cannot remove {n_remove} of {num_layers} layers: allowed 1..{num_layers - 1}")

    #: Whether `fit` reads calibration activations of the unmodified model (moments, token rows,
    #: training pairs). Such methods store every layer's activations during the score pass and
    #: replay them in `fit` instead of running a second forward pass.
    fit_reads_activations: ClassVar[bool] = False

    #: Set by `prune`: where statistics of the unmodified model may be read from and stored, and
    #: where its activations are (or would be) stored.
    statistics_cache: StatisticsCache | None = None
    activations: ActivationSlot | None = None

    def gather(self, adapter: ModelAdapter, calibration: CalibrationData, statistics: list[Statistic],
               progress: bool = True, what: str = "calibration") -> list[Statistic]:
        """Statistics of the model as it is now, from the shared cache or the stored activations where
        possible, else one forward pass. Only for statistics of the ORIGINAL model (neither the cache
        key nor the stored activations see in-place changes)."""
        return gather(adapter, calibration.batches, statistics, cache=self.statistics_cache, progress=progress,
                      description=f"{self.name}: {what}", activations=self.activations)

    def check_model(self, adapter: ModelAdapter) -> None:
        """Raise `ConfigError` if the method cannot prune this architecture (checked before calibration)."""

    # -- stages ----------------------------------------------------------------------------
    @abstractmethod
    def statistics(self, adapter: ModelAdapter, n_remove: int) -> list[Statistic]:
        """The calibration statistics the score stage needs (collected in one shared pass)."""

    @abstractmethod
    def select(self, statistics: list[Statistic], adapter: ModelAdapter, n_remove: int) -> Selection:
        ...

    def fit(self, adapter: ModelAdapter, selection: Selection, calibration: CalibrationData,
            progress: bool = True) -> Any:
        """Fit whatever replaces the removed layers; ``None`` when the method only removes."""
        return None

    def apply(self, adapter: ModelAdapter, selection: Selection, replacement: Any) -> dict | None:
        """Change the model; return a JSON-able description of the replacement (or ``None``)."""
        adapter.remove_layers(selection.removed_layers)
        return None

    # -- orchestration ---------------------------------------------------------------------
    def prune(self, adapter: ModelAdapter, calibration: CalibrationData, n_remove: int,
              progress: bool = True, cache: StatisticsCache | None = None,
              activation_budget_bytes: int = DEFAULT_ACTIVATION_BUDGET, keep_activations: bool = True) -> PruneResult:
        """Run the stages. With a ``cache``, score statistics already computed for this model and
        calibration data (by any run, any method, any ratio) are read instead of recomputed, and so
        are the stored activations that fits read (with ``keep_activations``); otherwise those
        activations live in a temporary directory for this call only. ``activation_budget_bytes``
        caps their size on disk (0: never store them; fits then run their own forward pass)."""
        self.check_model(adapter)
        self.check_feasible(adapter.num_layers, n_remove)
        self.statistics_cache = cache
        with tempfile.TemporaryDirectory(prefix="depthbench-activations-") as tmp:
            if not self.fit_reads_activations:
                self.activations = None
            elif cache is not None and keep_activations:
                self.activations = cache.activation_slot(data_fingerprint(calibration.batches),
                                                         activation_budget_bytes)
            else:
                self.activations = ActivationSlot(Path(tmp) / "store", activation_budget_bytes)
            try:
                return self._run_stages(adapter, calibration, n_remove, progress)
            finally:
                self.activations = None

    def _run_stages(self, adapter: ModelAdapter, calibration: CalibrationData, n_remove: int,
                    progress: bool) -> PruneResult:
        num_layers = adapter.num_layers
        timer = StageTimer()
        params_before = adapter.parameter_counts()
        with timer.stage("score"):
            stats = self.gather(adapter, calibration, self.statistics(adapter, n_remove), progress, "calibration")
        with timer.stage("select"):
            selection = self.select(stats, adapter, n_remove)
        with timer.stage("fit"):
            replacement = self.fit(adapter, selection, calibration, progress=progress)
        with timer.stage("apply"):
            replacement_info = self.apply(adapter, selection, replacement)
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
        )


pruner_registry: Registry[type[Pruner]] = Registry("pruner", base=Pruner, entry_point_group="depthbench.pruners")


def build_pruner(name: str, options: dict | None = None) -> Pruner:
    return pruner_registry.get(name)(**(options or {}))

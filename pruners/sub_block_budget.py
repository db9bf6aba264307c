"""How many attention / MLP sub-blocks a sub-block method removes for the pipeline's ``R`` layers.

A module is not a layer (METHODS-MORE, "Ratio for sub-layer methods"), so a sub-block method states its
budget in one of two ways:

- ``budget: params``: take modules in the method's order until the removed decoder parameters reach at
  least those of ``R`` whole layers (``R`` x the parameters of one original layer);
- ``budget: count``: take a fixed number of modules: ``n_modules`` when given, else ``R`` for a method
  choosing among one kind of module (LLM-Drop ``attn`` / ``mlp``) and ``2R`` among both kinds (LLM-Drop
  ``joint``, BlockPruner). The pipeline hands a pruner ``R = round(r L)``, not r, so ``2R`` stands for the
  reference's ``round(r 2L)``; the two differ by one when the fractional part of ``r L`` lies in
  [0.25, 0.75) (SmolLM2 at r = 0.25: ``r L`` = 7.5, ``2R`` = 16 against 15): ``n_modules`` sets the
  reference's number exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from depthbench.errors import ConfigError
from depthbench.modeling.units import Unit, UnitLike, normalize_units

BUDGETS = ("count", "params")


def check_budget(pruner: str, budget: str, n_modules: int) -> None:
    """`ConfigError` naming the value for a bad ``budget`` / ``n_modules`` (before any weight is read)."""
    if budget not in BUDGETS:
        raise ConfigError(f"pruner {pruner!r} option budget={budget!r}; allowed: {', '.join(BUDGETS)}")
    if n_modules < 0:
        raise ConfigError(f"pruner {pruner!r} option n_modules={n_modules}; allowed: 0 (from the ratio) or a "
                          f"positive number of modules")
    if n_modules and budget != "count":
        raise ConfigError(f"pruner {pruner!r} option n_modules={n_modules} needs budget=count (budget={budget!r})")


def module_count(n_layers: int, n_modules: int, both_kinds: bool) -> int:
    """The number of modules ``budget: count`` removes (see the module docstring)."""
    return n_modules or (2 * n_layers if both_kinds else n_layers)


def removed_parameters(adapter, units: Iterable[UnitLike]) -> int:
    """Decoder parameters the original model loses when ``units`` (original numbering) are removed: a
    layer's two sub-blocks count as the whole layer (a norm they share included)."""
    return sum(adapter.unit_parameter_count(u) for u in normalize_units(units))


def parameter_target(adapter, n_layers: int) -> int:
    """What ``budget: params`` must reach: the parameters of ``n_layers`` layers of the original model."""
    return n_layers * adapter.parameter_counts()["per_layer"]


class Budget:
    """When a method that takes modules one at a time (in its own order) stops.

    ``count``: after a fixed number; ``params``: at the first prefix whose removed parameters reach the
    target. Counts parameters on the ORIGINAL model: call `done` before anything is removed from it.
    """

    def __init__(self, adapter, budget: str, n_layers: int, n_modules: int, both_kinds: bool):
        self.adapter, self.budget = adapter, budget
        self.count = module_count(n_layers, n_modules, both_kinds)
        self.target = parameter_target(adapter, n_layers)

    def done(self, taken: list[Unit]) -> bool:
        if self.budget == "count":
            return len(taken) >= self.count
        return removed_parameters(self.adapter, taken) >= self.target

    def check_reachable(self, candidates: list[Unit]) -> None:
        """`ConfigError` when even every candidate together does not meet the budget, or meets it only by
        removing every layer."""
        n = self.adapter.num_layers
        if self.budget == "count" and not 1 <= self.count <= len(candidates):
            raise ConfigError(f"cannot remove {self.count} modules: {len(candidates)} candidates")
        if self.budget == "params" and removed_parameters(self.adapter, candidates) < self.target:
            raise ConfigError(f"budget=params: the {len(candidates)} candidate modules hold fewer parameters than "
                              f"the {self.target} of the layers to remove; use budget=count")
        if self.budget == "count" and self.count >= 2 * n and len(candidates) == 2 * n:
            raise ConfigError(f"cannot remove all {2 * n} modules of {n} layers")

    def describe(self) -> dict:
        return ({"budget": "count", "modules": self.count} if self.budget == "count"
                else {"budget": "params", "target_parameters": self.target})

    def take(self, ranked: list[Unit]) -> list[Unit]:
        """The shortest prefix of ``ranked`` (best first) that meets the budget."""
        taken: list[Unit] = []
        for unit in ranked:
            if self.done(taken):
                break
            taken.append(unit)
        if not self.done(taken):
            raise ConfigError(f"the budget {self.describe()} is not reachable with {len(ranked)} candidate modules")
        return taken

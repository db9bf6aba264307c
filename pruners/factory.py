"""Building a pruner from its config: the registered method with its options, wrapped by the pruner-level
features that apply to any method (Prune&Comp, `depthbench.pruners.methods.compensation`)."""

from __future__ import annotations

from depthbench.pruners.base import Pruner, pruner_registry
from depthbench.pruners.methods.compensation import CompensatedPruner, parse_compensation


def build_pruner(name: str, options: dict | None = None, compensate: str = "none", compensate_mode: str = "iterative",
                 compensate_fold: str = "after") -> Pruner | CompensatedPruner:
    """The registered pruner ``name`` with ``options``; with ``compensate=magnitude``, wrapped by Prune&Comp."""
    settings = parse_compensation(compensate, compensate_mode, compensate_fold)
    pruner = pruner_registry.get(name)(**(options or {}))
    return CompensatedPruner(pruner, settings) if settings.active else pruner

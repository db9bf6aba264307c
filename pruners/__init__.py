"""Depth-pruning methods, each a plugin in `pruner_registry` behind the `Pruner` interface."""

from depthbench.pruners.base import PruneResult, Pruner, Selection, build_pruner, pruner_registry

# Built-in methods register themselves on import; third parties use the `depthbench.pruners`
# entry-point group instead (see README).
from depthbench.pruners import uidl  # noqa: E402,F401
from depthbench.pruners import replaceme, shortgpt, llm_streamline  # noqa: E402,F401

__all__ = ["PruneResult", "Pruner", "Selection", "build_pruner", "pruner_registry"]

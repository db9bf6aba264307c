"""Depth-pruning methods, each a plugin in `pruner_registry` behind the `Pruner` interface.

The methods themselves are in `depthbench.pruners.methods` (one module each); this package holds what they share:
the interface and registry (`base`), options (`options`), building a configured pruner (`factory`), candidate
scoring options (`candidate_scoring`), convergence checks (`convergence`), the Hadamard rotation (`hadamard`) and
the sub-block parameter budget (`sub_block_budget`)."""

from depthbench.calibration.service import CalibrationService
from depthbench.pruners.base import PruneResult, Pruner, Selection, pruner_registry
from depthbench.pruners.factory import build_pruner
from depthbench.pruners.options import option

# The built-in methods (depthbench.pruners.methods) register themselves when the registry first looks up a name
# (pruner_registry's builtin_modules), not here: this package never imports its methods at import time.

__all__ = ["CalibrationService", "PruneResult", "Pruner", "Selection", "build_pruner", "option", "pruner_registry"]

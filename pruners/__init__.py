"""Depth-pruning methods, each a plugin in `pruner_registry` behind the `Pruner` interface.

The methods themselves are in `depthbench.pruners.methods` (one module each); this package holds what they share:
the interface and registry (`base`), options (`options`), building a configured pruner (`factory`), candidate
scoring options (`candidate_scoring`), convergence checks (`convergence`), the Hadamard rotation (`hadamard`) and
the sub-block parameter budget (`sub_block_budget`)."""

from depthbench.calibration.service import CalibrationService
from depthbench.pruners.base import PruneResult, Pruner, Selection, pruner_registry
from depthbench.pruners.factory import build_pruner
from depthbench.pruners.options import option

# Built-in methods register themselves on import; third parties use the `depthbench.pruners`
# entry-point group instead (see docs/PLUGINS.md).
from depthbench.pruners.methods import uidl  # noqa: E402,F401
from depthbench.pruners.methods import replaceme, shortgpt, llm_streamline  # noqa: E402,F401
from depthbench.pruners.methods import sleb, shortened_llama  # noqa: E402,F401
from depthbench.pruners.methods import llm_drop, blockpruner  # noqa: E402,F401
from depthbench.pruners.methods import finercut  # noqa: E402,F401
from depthbench.pruners.methods import baselines  # noqa: E402,F401
from depthbench.pruners.methods import laco, linearpatch  # noqa: E402,F401
from depthbench.pruners.methods import mka  # noqa: E402,F401

__all__ = ["CalibrationService", "PruneResult", "Pruner", "Selection", "build_pruner", "option", "pruner_registry"]

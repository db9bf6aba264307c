"""Depth-pruning methods, each a plugin in `pruner_registry` behind the `Pruner` interface."""

from depthbench.calibration.service import CalibrationService
from depthbench.pruners.base import PruneResult, Pruner, Selection, pruner_registry
from depthbench.pruners.factory import build_pruner
from depthbench.pruners.options import option

# Built-in methods register themselves on import; third parties use the `depthbench.pruners`
# entry-point group instead (see docs/PLUGINS.md).
from depthbench.pruners import uidl  # noqa: E402,F401
from depthbench.pruners import replaceme, shortgpt, llm_streamline  # noqa: E402,F401
from depthbench.pruners import sleb, shortened_llama  # noqa: E402,F401
from depthbench.pruners import llm_drop, blockpruner  # noqa: E402,F401
from depthbench.pruners import finercut  # noqa: E402,F401
from depthbench.pruners import baselines  # noqa: E402,F401
from depthbench.pruners import laco, linearpatch  # noqa: E402,F401
from depthbench.pruners import mka  # noqa: E402,F401

__all__ = ["CalibrationService", "PruneResult", "Pruner", "Selection", "build_pruner", "option", "pruner_registry"]

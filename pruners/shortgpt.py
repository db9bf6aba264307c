"""ShortGPT (Men et al. 2024, arXiv 2403.03853): drop the layers that change the residual stream least.

Block Influence ``BI_k = 1 - mean over all tokens of cos(h_k, h_{k+1})``; the R layers with the
lowest BI are removed individually (they need not be contiguous), one shot: BI is not recomputed
after a removal. The official code sums ``1 - cos`` over fixed-length windows, which ranks layers
exactly as the mean does when all windows have the same length.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthbench.calibration.statistics import PairwiseSimilarity
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.selection.blocks import lowest_layers


def block_influence(statistics) -> list[float]:
    """``BI_k`` for every layer k, from the shared gap-1, all-token similarity statistic."""
    stat = next(s for s in statistics if isinstance(s, PairwiseSimilarity) and s.key[1:] == (1, "all"))
    return [float(1.0 - c) for c in stat.mean_cosine()]


@pruner_registry.register("shortgpt")
class ShortGPTPruner(Pruner):
    name = "shortgpt"
    paper = ("Men et al. 2024, ShortGPT: Layers in Large Language Models are More Redundant Than You Expect "
             "(arXiv 2403.03853)")

    @dataclass
    class Options:
        pass

    def statistics(self, adapter, n_remove):
        return [PairwiseSimilarity(adapter.num_layers, gap=1, tokens="all")]

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        bi = block_influence(statistics)
        return Selection(
            removed_layers=lowest_layers(bi, n_remove),
            scores={"metric": "Block Influence BI_k = 1 - mean over all tokens of cos(h_k, h_{k+1})",
                    "layers": list(range(len(bi))), "values": bi},
        )

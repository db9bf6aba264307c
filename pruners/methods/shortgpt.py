"""ShortGPT (Men et al. 2024, arXiv 2403.03853): drop the layers that change the residual stream least.

Block Influence ``BI_k = 1 - mean over all tokens of cos(h_k, h_{k+1})``; the R layers with the
lowest BI are removed individually (they need not be contiguous), one shot: BI is not recomputed
after a removal. The official code sums ``1 - cos`` over fixed-length windows, which ranks layers
exactly as the mean does when all windows have the same length.

The last layer: the paper defines BI on the layer's output h_L; the official code reads HF's
``output_hidden_states[-1]``, which is taken AFTER the final norm, so it scores the last layer on
``cos(h_{L-1}, norm(h_L))``. ``last_layer: pre_norm`` (default) follows the definition, ``final_norm`` the
official code; with non-trivial final-norm gains the two can remove different layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthbench.calibration.statistics import FinalNormSimilarity, PairwiseSimilarity
from depthbench.errors import ConfigError
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.options import option
from depthbench.selection.blocks import lowest_layers


LAST_LAYER = ("pre_norm", "final_norm")


def block_influence(statistics) -> list[float]:
    """``BI_k`` for every layer k, from the shared gap-1, all-token similarity statistic; the last layer's from
    `FinalNormSimilarity` where it is among ``statistics`` (``last_layer: final_norm``)."""
    stat = next(s for s in statistics if isinstance(s, PairwiseSimilarity) and s.key[1:] == (1, "all"))
    bi = [float(1.0 - c) for c in stat.mean_cosine()]
    final = next((s for s in statistics if isinstance(s, FinalNormSimilarity)), None)
    if final is not None:
        bi[-1] = 1.0 - final.mean_cosine()
    return bi


@pruner_registry.register("shortgpt")
class ShortGPTPruner(Pruner):
    name = "shortgpt"
    supports_layerwise = True
    paper = ("Men et al. 2024, ShortGPT: Layers in Large Language Models are More Redundant Than You Expect "
             "(arXiv 2403.03853)")

    @dataclass
    class Options:
        last_layer: str = option("pre_norm", "The last layer's BI: pre_norm (the paper's definition, on its output "
                                             "h_L) or final_norm (the official code: on norm(h_L), HF's last hidden "
                                             "state)")

    def validate_options(self) -> None:
        if self.options.last_layer not in LAST_LAYER:
            raise ConfigError(f"pruner 'shortgpt' option last_layer={self.options.last_layer!r}; allowed: "
                              f"{', '.join(LAST_LAYER)}")

    def statistics(self, adapter, n_remove):
        stats = [PairwiseSimilarity(adapter.num_layers, gap=1, tokens="all")]
        if self.options.last_layer == "final_norm":
            stats.append(FinalNormSimilarity(adapter.num_layers, adapter.final_norm()))
        return stats

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        bi = block_influence(statistics)
        metric = "Block Influence BI_k = 1 - mean over all tokens of cos(h_k, h_{k+1})"
        if self.options.last_layer == "final_norm":
            metric += "; the last layer on cos(h_{L-1}, norm(h_L))"
        return Selection(
            removed_layers=lowest_layers(bi, n_remove),
            scores={"metric": metric, "layers": list(range(len(bi))), "values": bi},
        )

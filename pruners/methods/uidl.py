"""UIDL (Gromov et al. 2024, arXiv 2403.17887): drop the contiguous block whose ends are closest.

``d(s) = mean over sequences of ang(h_s, h_{s+n})`` on each sequence's last token; the block
[s, s+n) with the smallest d is removed, one shot, no healing. Starts range over
``min_start .. L-n``: the public implementations compare layer outputs, so layer 0 is never removed
(``min_start: 1``, default); ``min_start: 0`` gives the paper's range.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthbench.calibration.statistics import PairwiseSimilarity
from depthbench.errors import ConfigError
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.options import option
from depthbench.selection.blocks import best_block


def last_token_angular_distances(statistics, n: int, min_start: int) -> tuple[list[int], list[float]]:
    """Candidate starts and their mean last-token angular distance d(s), from a shared statistic."""
    stat = next(s for s in statistics if isinstance(s, PairwiseSimilarity) and s.key[1:] == (n, "last"))
    d = stat.mean_angular_distance()
    starts = [s for s in stat.starts if s >= min_start]
    return starts, [float(d[stat.starts.index(s)]) for s in starts]


@pruner_registry.register("uidl")
class UIDLPruner(Pruner):
    name = "uidl"
    supports_layerwise = True
    paper = "Gromov et al. 2024, The Unreasonable Ineffectiveness of the Deeper Layers (arXiv 2403.17887)"

    @dataclass
    class Options:
        min_start: int = option(1, "First candidate block start: 1 = the public implementations (they compare layer "
                                   "outputs, so layer 0 is never removed); 0 = the paper's range.")

    def validate_options(self) -> None:
        if self.options.min_start not in (0, 1):
            raise ConfigError(f"uidl min_start={self.options.min_start!r}; allowed: 0 (paper) or 1 (reference code)")

    def statistics(self, adapter, n_remove):
        return [PairwiseSimilarity(adapter.num_layers, gap=n_remove, tokens="last")]

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        starts, d = last_token_angular_distances(statistics, n_remove, self.options.min_start)
        block = best_block(d, starts, n_remove)
        return Selection(
            removed_layers=block.layers,
            blocks=[block],
            scores={"metric": "mean last-token angular distance d(s) between h_s and h_{s+n}",
                    "n": n_remove, "starts": starts, "values": d},
        )

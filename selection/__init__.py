"""Which layers to remove: block choices on per-layer or per-block scores (the distances themselves are
accumulated by the calibration statistics, `depthbench.calibration.statistics`), and the iterative removal
loops of the methods that re-score the model per candidate (`depthbench.selection.greedy`)."""

from depthbench.selection.blocks import Block, best_block, greedy_blocks, lowest_layers, merge_touching
from depthbench.selection.greedy import first_argmin, greedy_removal, ranked_removal

__all__ = ["Block", "best_block", "first_argmin", "greedy_blocks", "greedy_removal", "lowest_layers", "merge_touching",
           "ranked_removal"]

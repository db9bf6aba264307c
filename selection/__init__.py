"""Which layers to remove: block choices on per-layer or per-block scores (the distances themselves are
accumulated by the calibration statistics, `depthbench.calibration.statistics`)."""

from depthbench.selection.blocks import Block, best_block, greedy_blocks, lowest_layers, merge_touching

__all__ = ["Block", "best_block", "greedy_blocks", "lowest_layers", "merge_touching"]

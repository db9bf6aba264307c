"""Which layers to remove: distances between residual-stream states and the block choices on them."""

from depthbench.selection.blocks import Block, best_block, greedy_blocks, lowest_layers, merge_touching
from depthbench.selection.distances import angular_distance, cosine_similarity

__all__ = ["Block", "best_block", "greedy_blocks", "lowest_layers", "merge_touching", "angular_distance",
           "cosine_similarity"]

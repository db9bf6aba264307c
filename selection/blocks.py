"""Block choices over per-start or per-layer scores (lower score = more removable).

A block is the half-open range [start, end) of removed decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from depthbench.errors import ConfigError


@dataclass(frozen=True, order=True)
class Block:
    start: int
    end: int

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start

    def overlaps(self, other: "Block") -> bool:
        return self.start < other.end and other.start < self.end


def best_block(scores: Sequence[float], starts: Sequence[int], length: int) -> Block:
    """The block [s, s+length) with the smallest score over candidate starts (first on ties)."""
    if not starts:
        raise ConfigError(f"no candidate block of {length} layers fits the model")
    best = min(range(len(starts)), key=lambda j: (float(scores[j]), starts[j]))
    return Block(starts[best], starts[best] + length)


def greedy_blocks(scores: Sequence[float], starts: Sequence[int], length: int, count: int) -> list[Block]:
    """Take blocks in order of increasing score, skipping any that overlap one already taken."""
    ranked = sorted(range(len(starts)), key=lambda j: (float(scores[j]), starts[j]))
    taken: list[Block] = []
    for j in ranked:
        block = Block(starts[j], starts[j] + length)
        if not any(block.overlaps(t) for t in taken):
            taken.append(block)
            if len(taken) == count:
                return sorted(taken)
    raise ConfigError(
        f"only {len(taken)} non-overlapping blocks of {length} layers fit; num_blocks={count} requested"
    )


def merge_touching(blocks: Sequence[Block]) -> list[Block]:
    """Blocks where one's end is the next one's start become one block."""
    merged: list[Block] = []
    for block in sorted(blocks):
        if merged and merged[-1].end == block.start:
            merged[-1] = Block(merged[-1].start, block.end)
        else:
            merged.append(block)
    return merged


def lowest_layers(scores: Sequence[float], count: int) -> list[int]:
    """Indices of the ``count`` lowest scores (need not be contiguous), sorted ascending."""
    if not 0 < count < len(scores):
        raise ConfigError(f"cannot remove {count} of {len(scores)} layers")
    ranked = sorted(range(len(scores)), key=lambda k: (float(scores[k]), k))
    return sorted(ranked[:count])

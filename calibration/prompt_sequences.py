"""Every calibration sequence's residual stream ``h_k``, k = 0..L-1, as a fixed-size ``[positions x d]`` array per
sequence, spilled to disk in float32 (MKA's activations, `depthbench.pruners.methods.mka`).

A sequence's real tokens (attention mask 1), in order, are cut to ``positions`` and zero-padded after that, so
row ``t`` of a sequence is its ``t``-th real token whatever side the batch was padded on, and every position past
its length is a zero row, as the MKA reference's ``hidden_states[k][:, :512]`` of an unpadded prompt padded with
zeros. One hooked pass serves every layer (the reference runs one forward per layer).

Only ``width = min(positions, longest calibration sequence)`` positions are written: the positions beyond are zero
in every sequence, so `virtual_rows` supplies them without storing them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from depthbench.calibration.spill import SpillArray, SpillFile
from depthbench.calibration.statistics import RESIDUAL, BatchActivations, HookPoint, Statistic

_instance_counter = itertools.count()


def real_tokens_first(x: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` [B, T, d] with each row's real tokens moved to the front, in order, cut to ``width`` positions and
    zero after its length: [B, width, d] float32 on the CPU."""
    mask = mask.to(x.device).bool()
    b, t, d = x.shape
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # real positions first, in order
    rows = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, d)).to(torch.float32)
    keep = torch.arange(order.shape[1], device=x.device).unsqueeze(0) < mask.sum(1, keepdim=True)
    out = torch.zeros(b, width, d, dtype=torch.float32)
    out[:, : order.shape[1]] = (rows * keep.unsqueeze(-1)).cpu()
    return out


class PromptSequences(Statistic):
    """``h_k`` for k in ``layers``, one ``[width, d]`` float32 row per calibration sequence, in batch order."""

    #: Spilled rows live in a caller-owned temporary directory: nothing to keep in a statistics cache.
    cacheable = False

    def __init__(self, layers: list[int], hidden_size: int, width: int, directory: str | Path):
        if width < 1:
            raise ValueError(f"width {width} must be >= 1")
        self.layers, self.width = list(layers), int(width)
        self._id = next(_instance_counter)
        directory = Path(directory)
        self.files = {k: SpillFile(directory / f"prompts_{self._id}_h{k}.f32", (self.width, hidden_size))
                      for k in self.layers}

    @property
    def key(self) -> tuple:
        return (type(self).__name__, tuple(self.layers), self.width, self._id)

    @property
    def count(self) -> int:
        return self.files[self.layers[0]].rows

    def hook_points(self) -> set[HookPoint]:
        return {(RESIDUAL, k) for k in self.layers}

    def update(self, batch: BatchActivations) -> None:
        for k in self.layers:
            self.files[k].append(real_tokens_first(batch.residual(k), batch.mask, self.width))

    def open(self, k: int) -> SpillArray:
        """``h_k`` of every sequence, ``(n, width, d)``."""
        return self.files[k].open()


def virtual_rows(sequences: SpillArray | np.ndarray, positions: int, start: int, count: int) -> np.ndarray:
    """Rows ``start .. start+count-1`` of the sequences flattened to ``(n * positions, d)`` token rows, where each
    sequence is ``positions`` long: the stored ``width`` rows, then zeros (and nothing past the last sequence)."""
    n, width, d = sequences.shape
    out = np.zeros((count, d), dtype=np.float32)
    flat = np.arange(start, start + count)
    seq, pos = flat // positions, flat % positions
    stored = (pos < width) & (seq < n)
    for s in np.unique(seq[stored]):
        where = stored & (seq == s)
        out[where] = sequences[int(s)][pos[where]]
    return out

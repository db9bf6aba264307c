"""A single run's stored activations held in memory, on the model's device, when they fit.

The disk store (`depthbench.calibration.activations`) exists so that a later fit, in this run or in any later
cell of a sweep, replays activations instead of running the model again. A single run's store is temporary: it
serves this run's one fit and is deleted afterwards. Written to disk it costs what the device-to-host copies and
the writes cost (on a GPU about twenty times the forward pass it saves; on a CPU at disk speed once it overflows
the page cache: docs/cold_single_run.json), and re-reading it costs again. Where the store fits in the memory left
beside the model, it is kept there: one copy per batch on the device into buffers allocated once
(`MemoryWriter`), no device-to-host copy, no write, no read back, and the fit's statistics see exactly the
tensors a forward pass would give them, on the same device.

`MemorySlot` has the interface of `depthbench.calibration.activations.ActivationSlot` (``open``, ``complete``,
``discard``, ``store_size``, ``admits``, ``writer``), so the pass and the fit use either without knowing which.
Its budget is ``cache.activations_memory_gb``: ``auto`` = `AUTO_MEMORY_SHARE` of the memory available on the model's
device when the prune starts (`available_memory`), so the fit's own buffers and the evaluation still fit.
A sweep's shared store stays on disk: other cells run in other processes (or after this one has released it).
"""

from __future__ import annotations

import torch

from depthbench.calibration.activations import (StoredActivations, all_hook_points, batch_shape, checked_points,
                                               store_bytes)
from depthbench.calibration.statistics import BatchActivations, HookPoint, Statistic

#: ``cache.activations_memory_gb: auto``: at most this share of the memory available on the model's device.
AUTO_MEMORY_SHARE = 0.5


def available_memory(device: torch.device) -> int:
    """Bytes available for new tensors on ``device``: free GPU memory (CUDA) or the host's available memory
    (without swapping: free pages plus reclaimable cache)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def memory_budget(setting, device: torch.device) -> int:
    """``cache.activations_memory_gb`` in bytes for a model on ``device``: ``auto`` = `AUTO_MEMORY_SHARE` of
    `available_memory`; a number = that many GiB; 0 = never in memory."""
    if setting == "auto":
        return int(AUTO_MEMORY_SHARE * available_memory(device))
    return int(float(setting) * 1024**3)


class MemoryStore(StoredActivations):
    """A complete store in memory: per hook point, every batch's ``[B, T, d]`` tensor as the pass produced it."""

    where = "memory"

    def __init__(self, tensors: dict[HookPoint, list[torch.Tensor]], shapes: list[tuple[int, int]]):
        self.tensors, self.shapes = tensors, shapes
        self.directory = "memory"  # what log lines name

    def read(self, point: HookPoint, batch_index: int) -> torch.Tensor:
        return self.tensors[point][batch_index]

    def check(self, statistics: list[Statistic], batches: list[dict]) -> None:
        """Raise `ValueError` unless the store can serve ``statistics`` on ``batches``."""
        if not self.matches(batches):
            raise ValueError("stored activations were written for other calibration batches")
        unknown = set().union(*(s.hook_points() for s in statistics)) - set(self.tensors)
        if unknown:
            raise ValueError(f"hook points {sorted(unknown)} are not stored")


class MemoryWriter(Statistic):
    """Copies every hook point of every batch into one buffer per point, allocated once for the whole calibration
    set on the point's device; `commit` completes the store.

    Why copies into preallocated buffers and not references to the pass's own tensors: thousands of kept tensors
    interleaved with the pass's temporaries fragment the host allocator's heap (measured on this 2-core CPU by
    `benchmarks/cold_single_run.py` at commit ce02597, which kept references; that record was not committed:
    peak RSS 10.2 GB for a 4.6 GB store, and a score pass 30 s slower than with no store at all); one allocation
    per point leaves the temporaries' reuse as it is without a store, for one copy per batch (device memory
    bandwidth)."""

    cacheable = False

    def __init__(self, slot: "MemorySlot", num_layers: int, hidden_size: int, dtype: torch.dtype,
                 batches: list[dict]):
        self.slot, self.hidden_size, self.dtype = slot, hidden_size, dtype
        self.points = all_hook_points(num_layers)
        self.positions = sum(int(b["input_ids"].numel()) for b in batches)
        self.buffers: dict[HookPoint, torch.Tensor] = {}
        self.tensors: dict[HookPoint, list[torch.Tensor]] = {p: [] for p in self.points}
        self.shapes: list[tuple[int, int]] = []
        self.offset = 0

    @property
    def key(self) -> tuple:
        return (type(self).__name__, id(self.slot))

    def hook_points(self) -> set[HookPoint]:
        return set(self.points)

    def update(self, batch: BatchActivations) -> None:
        b, t = batch_shape(batch, self.points)
        if self.offset + b * t > self.positions:
            raise ValueError(f"more calibration positions than the {self.positions} the store was sized for")
        self.shapes.append((b, t))
        for point, x in checked_points(batch, self.points, self.dtype, self.hidden_size):
            if point not in self.buffers:
                self.buffers[point] = torch.empty(self.positions, self.hidden_size, dtype=self.dtype, device=x.device)
            rows = self.buffers[point][self.offset:self.offset + b * t]
            rows.copy_(x.detach().reshape(b * t, self.hidden_size))
            self.tensors[point].append(rows.view(b, t, self.hidden_size))
        self.offset += b * t

    def commit(self) -> None:
        self.slot.store = MemoryStore(self.tensors, self.shapes)

    def abort(self) -> None:
        self.tensors.clear()
        self.buffers.clear()


class MemorySlot:
    """A single run's store kept in memory, within ``budget_bytes`` (see the module docstring)."""

    where = "memory"

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.store: MemoryStore | None = None

    def open(self) -> MemoryStore | None:
        return self.store

    def complete(self) -> bool:
        return self.store is not None

    def discard(self) -> None:
        self.store = None

    def store_size(self, adapter, batches: list[dict]) -> int:
        """Bytes the store of this model (in its dtype) and these batches holds."""
        return store_bytes(adapter.num_layers, adapter.hidden_size, adapter.embeddings().weight.dtype, batches)

    def admits(self, size: int) -> bool:
        return size <= self.budget_bytes

    def writer(self, adapter, batches: list[dict]) -> MemoryWriter | None:
        if not self.admits(self.store_size(adapter, batches)):
            return None
        return MemoryWriter(self, adapter.num_layers, adapter.hidden_size, adapter.embeddings().weight.dtype,
                            batches)

"""Store the original model's activations for later fits, or recompute them: chosen per run from measured costs.

A method whose fit reads activations of the original model (ReplaceMe's moments and rows, LLM-Streamline's
training pairs) needs them AFTER selection, when the score pass is over. Two ways to get them:

- ``store``: the score pass writes every layer's activations to disk (`depthbench.calibration.activations`) and
  the fit replays the few files it needs. Costs: the device-to-host copy, CRC and write of (2L + 1) hook points,
  then reading back the fit's points (CRC check + read). On a CPU the forward pass dominates (SmolLM2 float32,
  128 x 256 tokens: a 191 s pass against a few seconds of writes, docs/cold_single_run.json): one pass in all.
- ``recompute``: nothing is stored; the fit's statistics run their own forward pass, on the device and in the
  precision the statistic declares (ReplaceMe-LS's float64 moments), stopping after the last layer the fit
  needs (`depthbench.calibration.statistics.collect`). On a GPU a pass over 32k tokens at 8B costs about a
  second while the store's copies and writes cost about twenty (docs/PERFORMANCE.md): two passes are cheaper.

``auto`` measures instead of guessing the device. In the first pass that could write the store, the first
batch runs with every hook point observed; its forward time is taken (after a device synchronisation), and the
store's write and read throughput are probed by writing up to `PROBE_BYTES` of that batch's activations (copy,
CRC, write) to a file beside the store and reading them back (read, CRC). Scaled to the whole calibration set:

    store     = write of the whole store + later_fits x replay of one fit
    recompute = later_fits x one forward pass

where a replay reads `REPLAY_POINTS` hook points twice (CRC check, then the read) and ``later_fits`` is the
number of passes over the original model still to come in this run (1 for a single run of a method that fits;
0 when the fit's pass is the one running: nothing later could read a store). A store shared by the cells of a
sweep (or an explicit ``cache.dir``) serves any number of later cells, so its write is amortised: it is kept
when one replay is cheaper than the forward pass it replaces. The choice is made on the first batch, and the
rest of the pass writes the store or not (to store, that batch is written first). The deciding pass observes
every hook point, as a storing pass does, whatever it decides.

Biases, all towards ``store`` (today's behaviour, never slower than it on a CPU): a cold first batch (kernel
selection, lazy initialisation) overstates the forward time; the probe's write lands in the page cache, which a
store of many GB overflows; a fit's own pass stops after its last layer, cheaper than the full pass assumed.

`ActivationStrategy` carries the choice, an injectable ``clock`` and ``cost_model`` (tests simulate a device
with a cheap or an expensive forward pass), and the record of what ran and why (``result.json``'s
``calibration.activations``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from depthbench.calibration.activations import (ActivationSlot, ActivationWriter, _tmp_prefix, all_hook_points,
                                               append_bytes)
from depthbench.calibration.statistics import BatchActivations, HookPoint, Statistic

#: The strategies (``cache.activation_strategy``); ``auto`` decides per run from measured costs.
STRATEGIES = ("auto", "store", "recompute")
#: At most this many bytes of the first batch's activations are written and read back to probe the store.
PROBE_BYTES = 64 << 20
#: Hook points one fit replays (ReplaceMe-LS and -cosine: M_i, h_(i+1), h_e; LLM-Streamline: h_s, h_e).
REPLAY_POINTS = 3


@dataclass(frozen=True)
class ProbeCosts:
    """What the first batch measured: its forward pass (seconds) and the store's throughput on a sample of its
    activations (``probe_bytes`` copied, CRC'd and written in ``write_s``; read back and CRC'd in ``read_s``)."""

    forward_s: float
    probe_bytes: int
    write_s: float
    read_s: float


#: Maps the measured costs to those the decision sees: None (the measurement itself) on real hardware; tests
#: simulate a device whose forward pass is cheap or expensive.
CostModel = Callable[[ProbeCosts], ProbeCosts]


def synchronize(tensor: torch.Tensor) -> None:
    """Wait for the tensor's device (a GPU runs asynchronously: a clock read before this times the launch)."""
    backend = getattr(torch, tensor.device.type, None)
    sync = getattr(backend, "synchronize", None)
    if tensor.device.type != "cpu" and sync is not None:
        sync()


def check_strategy(value) -> str:
    if value not in STRATEGIES:
        raise ValueError(f"activation strategy {value!r}; allowed: {', '.join(STRATEGIES)}")
    return value


@dataclass
class ActivationStrategy:
    """How one prune gets the original model's activations for its later fits, and the record of it.

    ``fits``: passes over the original model this run makes (1 for a single run of a method that fits after
    scoring); ``None`` for a store shared with other runs (a sweep's cache), which any number of them replay.
    """

    mode: str = "auto"
    fits: int | None = 1
    clock: Callable[[], float] = time.perf_counter
    cost_model: CostModel | None = None
    requests: int = 0  # answered requests for statistics of the original model (the service counts them)
    passes: int = 0  # forward passes over the original model
    replays: int = 0  # times stored activations were replayed
    decision: dict = field(default_factory=dict)

    def __post_init__(self):
        check_strategy(self.mode)

    # -- the choice -----------------------------------------------------------------------
    def later_fits(self) -> int | None:
        """Passes over the original model still to come after the one being planned (None: any number)."""
        return None if self.fits is None else max(self.fits - self.requests, 0)

    def plan(self, slot: ActivationSlot, adapter, batches: list[dict]) -> str:
        """``store``, ``recompute`` or ``probe`` (auto: measure on the first batch) for a pass that could write
        ``slot``; a choice already made stands."""
        if self.decision.get("ran") in ("store", "recompute"):
            return self.decision["ran"]
        size = slot.store_size(adapter, batches)
        if not slot.admits(size):
            return self.decide("recompute", f"the store ({size / 1e9:.2f} GB) exceeds cache.activations_gb "
                                            f"({slot.budget_bytes / 1e9:.2f} GB)", store_bytes=size)
        if self.later_fits() == 0 and self.mode != "store":
            return self.decide("recompute", "no later pass of this run reads a store", store_bytes=size)
        if slot.where == "memory":  # nothing to weigh: the pass's own tensors are kept, nothing copied or written
            return self.decide("store", f"kept in memory on the model's device ({size / 1e9:.2f} GB within "
                                        f"cache.activations_memory_gb, {slot.budget_bytes / 1e9:.2f} GB): no copy, "
                                        "write or read back", store_bytes=size, where="memory")
        if self.mode == "store":
            return self.decide("store", "cache.activation_strategy=store", store_bytes=size)
        return "probe"

    def decide(self, ran: str, reason: str, **details) -> str:
        self.decision = {"ran": ran, "reason": reason, **details}
        return ran

    def choose(self, measured: ProbeCosts, store_bytes: int, num_points: int, scale: float) -> bool:
        """Whether to store, from the first batch's measured costs (``scale``: positions of the whole calibration
        set / positions of the first batch); records the numbers behind the choice."""
        seen = self.cost_model(measured) if self.cost_model is not None else measured
        per_byte_write = seen.write_s / max(seen.probe_bytes, 1)
        per_byte_read = seen.read_s / max(seen.probe_bytes, 1)
        forward = seen.forward_s * scale
        write = per_byte_write * store_bytes
        replay = 2 * per_byte_read * store_bytes * min(REPLAY_POINTS, num_points) / num_points
        later = self.later_fits()
        if later is None:
            store = replay < forward
            rule = "shared store (write amortised over the sweep's cells): store iff one replay < one forward pass"
            estimate = {"forward_pass": forward, "store_write": write, "replay_per_fit": replay}
        else:
            store_s, recompute_s = write + later * replay, later * forward
            store = store_s < recompute_s
            rule = f"store iff store write + {later} replay(s) < {later} forward pass(es)"
            estimate = {"forward_pass": forward, "store_write": write, "replay_per_fit": replay,
                        "store": store_s, "recompute": recompute_s}
        self.decide("store" if store else "recompute", f"measured on the first batch: {rule}",
                    store_bytes=store_bytes,
                    measured={**asdict(measured), "first_batch_share": 1 / scale},
                    **({"simulated": asdict(seen)} if seen != measured else {}),
                    estimated_s={k: round(v, 6) for k, v in estimate.items()})
        return store

    # -- the record -----------------------------------------------------------------------
    def record(self) -> dict:
        """``calibration.activations`` of result.json: the strategy asked for, what ran and why, the counts."""
        decision = self.decision or {"ran": "none", "reason": "no pass over the original model could write a store "
                                                              "(statistics cached, or a store already complete)"}
        return {"strategy": self.mode, "later_fits": "any" if self.fits is None else self.fits, **decision,
                "forward_passes": self.passes, "replays": self.replays}


def probe_store(points: list[torch.Tensor], directory: Path, clock: Callable[[], float],
                limit: int = PROBE_BYTES) -> tuple[int, float, float]:
    """Write up to ``limit`` bytes of ``points`` as the store writer does (host copy, CRC-32, ``write``) into a
    temporary directory beside the store (named like a writer's, so a killed probe is cleaned up as a killed
    writer is), read them back as a replay does (``numpy.fromfile``, CRC-32); (bytes, write s, read s)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=_tmp_prefix(directory, os.getpid())))
    try:
        path, written, crc = tmp / "probe.bin", 0, 0
        synchronize(points[0])
        started = clock()
        with open(path, "wb") as f:
            for x in points:
                crc, n = append_bytes(f, x, crc)
                written += n
                if written >= limit:
                    break
        write_s = clock() - started
        started = clock()
        zlib.crc32(np.fromfile(path, dtype=np.uint8))
        read_s = clock() - started
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written, write_s, read_s


class DecidingWriter(Statistic):
    """``auto``: the store writer of a pass whose first batch decides whether there is a store at all.

    It observes every hook point. On the first batch it takes the forward time (from `start`, after a device
    synchronisation), probes the store (`probe_store`), asks the strategy and, to store, opens an
    `ActivationWriter` and writes that batch; later batches go to the writer or nowhere. Put it first in the
    pass's statistics, so the forward time excludes the others' updates of the first batch.
    """

    cacheable = False

    def __init__(self, strategy: ActivationStrategy, slot: ActivationSlot, adapter, batches: list[dict]):
        self.strategy, self.slot, self.adapter, self.batches = strategy, slot, adapter, batches
        self.points = all_hook_points(adapter.num_layers)
        self.writer: ActivationWriter | None = None
        self.decided = False
        self.started = 0.0

    @property
    def key(self) -> tuple:
        return (type(self).__name__, str(self.slot.directory))

    def hook_points(self) -> set[HookPoint]:
        return set(self.points)

    def start(self) -> None:
        self.started = self.strategy.clock()

    def update(self, batch: BatchActivations) -> None:
        if not self.decided:
            self.decided = True
            first = batch.points[self.points[0]]
            synchronize(first)
            forward_s = self.strategy.clock() - self.started
            tensors = [batch.points[p] for p in self.points]
            probe_bytes, write_s, read_s = probe_store(tensors, self.slot.directory, self.strategy.clock,
                                                       PROBE_BYTES)
            positions = sum(int(b["input_ids"].numel()) for b in self.batches)
            if self.strategy.choose(ProbeCosts(forward_s, probe_bytes, write_s, read_s),
                                    self.slot.store_size(self.adapter, self.batches), len(self.points),
                                    scale=positions / int(first.shape[0] * first.shape[1])):
                self.writer = self.slot.writer(self.adapter, self.batches)
        if self.writer is not None:
            self.writer.update(batch)

    def commit(self) -> None:
        if self.writer is not None:
            self.writer.commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

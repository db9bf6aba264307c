"""Store the original model's activations for later fits, or recompute them: chosen per run from measured costs.

A method whose fit reads activations of the original model (ReplaceMe's moments and rows, LLM-Streamline's
training pairs) needs them AFTER selection, when the score pass is over. Two ways to get them:

- ``store``: the score pass writes every layer's activations to disk (`depthbench.calibration.activations`) and
  the fit replays the few files it needs. Costs: the device-to-host copy, CRC and write of (2L + 1) hook points,
  then reading back the fit's points (CRC check + read). On a CPU the forward pass usually costs more than the
  store's writes (docs/strategy_decision.json, docs/cold_single_run.json): one pass in all.
- ``recompute``: nothing is stored; the fit's statistics run their own forward pass, on the device and in the
  precision the statistic declares (ReplaceMe-LS's float64 moments), stopping after the last layer the fit
  needs (`depthbench.calibration.statistics.collect`). On a GPU a pass over 32k tokens at 8B costs about a
  second while the store's copies and writes cost about twenty (docs/PERFORMANCE.md): two passes are cheaper.

``auto`` measures instead of guessing the device, on the first two batches of the first pass that could write the
store (the pass observes every hook point, as a storing pass does, whatever it decides):

- the forward pass: the first two batches' forward times (clock read before each batch and after its last hook
  point, each after a device synchronisation). Each is an upper bound of the steady time per batch: the first
  carries one-off work (kernel selection, lazy initialisation, first-touch allocation), either may be slowed by
  other jobs on a shared machine. The cheaper of the two per position is priced (``forward_s``); both are
  recorded (``cold_forward_s``, ``second_forward_s``). With a single batch its time is all there is.
- the store's write: the first batch is written into the store itself (the writer's own step: host copy, CRC,
  ``write``), then flushed to the disk (``fsync``) and dropped from the page cache; write + flush is timed. A
  store of many GB overflows the page cache's dirty limits and runs at about this rate, which an unflushed
  probe of a few MB does not show (it lands in memory: docs/strategy_decision.json times both on this machine,
  the unflushed probe about ten times faster than the flushed write). Up to `PROBE_BYTES` of it
  are then read back from the disk (read, CRC) for the replay's rate. A smaller store, which the page cache
  absorbs, writes faster than priced: the error favours ``recompute`` only where the store is small, hence cheap
  either way.

Scaled to the whole calibration set (the forward by positions, the store's write and replay by bytes):

    store     = write of the whole store + later_fits x replay of one fit
    recompute = later_fits x the fit's own pass, priced as (forward pass) x fit_layers / L

where a replay reads `REPLAY_POINTS` hook points twice (CRC check, then the read) and ``later_fits`` is the
number of passes over the original model still to come in this run (1 for a single run of a method that fits;
0 when the fit's pass is the one running: nothing later could read a store). The fit's own pass stops after the
last layer it needs (`depthbench.calibration.statistics.collect`), so it runs ``fit_layers`` of the L decoder
layers. Where that depth is known when the pass runs it is used; where it is not (ReplaceMe's block is chosen
after the scores the deciding pass computes) the bound used is L: the deepest block ends at the last layer, and
a pass over all L layers (which, like every statistics pass, stops before the final norm and head) is exactly what
that worst case costs and never less than the fit's pass. That bound favours ``store``; how far is in the record
(``fit_layers``).

A store shared by the cells of a sweep (or an explicit ``cache.dir``) serves any number of later cells, so its
write is amortised: it is kept when one replay is cheaper than the fit's pass it replaces. If the choice is
``recompute``, the first batch's files are deleted (the decision costs that batch's write and a read of at most
`PROBE_BYTES`); if ``store``, the rest of the pass appends to them. Not priced: on a machine with few cores the
kernel's write-back of a multi-GB store competes with the forward pass for the CPUs, which can make the store
cost more in the pass than its flushed rate says (docs/PERFORMANCE.md's cold single run shows the outcome).

On a GPU a pass over 32k tokens at 8B costs about a second while the store's device-to-host copies and disk
writes cost about twenty: the same rule then chooses ``recompute`` for a single run (tests simulate such a device
with an injected cost model; not yet measured on a GPU: ``benchmarks/strategy_decision.py --device cuda``).

A single run's store that fits ``cache.activations_memory_gb`` is kept in memory on the model's device
(`depthbench.calibration.memory_store`): no host copy, write or read back to price, so it is kept without a
measurement (``where: memory`` in the record); everything above is for a store that goes to disk.

`ActivationStrategy` carries the choice, an injectable ``clock`` and ``cost_model`` (tests simulate a device
with a cheap or an expensive forward pass, or a disk slow to flush), and the record of what ran and why
(``result.json``'s ``calibration.activations``).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from depthbench.calibration.activations import ActivationSlot, ActivationWriter, all_hook_points
from depthbench.calibration.statistics import BatchActivations, HookPoint, Statistic
from depthbench.measure import synchronize

#: The strategies (``cache.activation_strategy``); ``auto`` decides per run from measured costs.
STRATEGIES = ("auto", "store", "recompute")
#: At most this many bytes of the first batch's stored activations are read back to time the replay's reads.
PROBE_BYTES = 64 << 20
#: Hook points one fit replays (ReplaceMe-LS and -cosine: M_i, h_(i+1), h_e; LLM-Streamline: h_s, h_e).
REPLAY_POINTS = 3


@dataclass(frozen=True)
class ProbeCosts:
    """What the first batches measured (seconds): the forward passes of the first batch (``cold_forward_s``, with
    its warm-up) and of the second (``second_forward_s``; None with one batch), and the one priced (``forward_s``:
    the cheaper per position); the first batch's ``write_bytes`` written to the store and flushed to the disk in
    ``write_s``; ``read_bytes`` of them read back from the disk and CRC'd in ``read_s``."""

    cold_forward_s: float
    second_forward_s: float | None
    forward_s: float
    write_bytes: int
    write_s: float
    read_bytes: int
    read_s: float


#: Maps the measured costs to those the decision sees: None (the measurement itself) on real hardware; tests
#: simulate a device whose forward pass is cheap or expensive.
CostModel = Callable[[ProbeCosts], ProbeCosts]


def check_strategy(value) -> str:
    if value not in STRATEGIES:
        raise ValueError(f"activation strategy {value!r}; allowed: {', '.join(STRATEGIES)}")
    return value


@dataclass
class ActivationStrategy:
    """How one prune gets the original model's activations for its later fits, and the record of it.

    ``fits``: passes over the original model this run makes (1 for a single run of a method that fits after
    scoring); ``None`` for a store shared with other runs (a sweep's cache), which any number of them replay.
    ``fit_layers``: how deep the fit's own pass goes, where known before it runs; ``None`` prices the full pass,
    the upper bound (see the module docstring).
    """

    mode: str = "auto"
    fits: int | None = 1
    fit_layers: int | None = None  # decoder layers the later fit's own pass runs, where known (None: all of them)
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
        if slot.where == "memory":  # nothing to weigh: kept on the device, nothing copied out or written
            return self.decide("store", f"kept in memory on the model's device ({size / 1e9:.2f} GB within "
                                        f"cache.activations_memory_gb, {slot.budget_bytes / 1e9:.2f} GB): no copy to "
                                        "the host, write or read back", store_bytes=size, where="memory")
        if self.mode == "store":
            return self.decide("store", "cache.activation_strategy=store", store_bytes=size)
        return "probe"

    def decide(self, ran: str, reason: str, **details) -> str:
        self.decision = {"ran": ran, "reason": reason, **details}
        return ran

    def choose(self, measured: ProbeCosts, store_bytes: int, num_points: int, num_layers: int,
               scale: float) -> bool:
        """Whether to store, from the first batches' measured costs (``scale``: positions of the whole calibration
        set / positions of the batch whose forward pass is priced); records the numbers behind the choice."""
        seen = self.cost_model(measured) if self.cost_model is not None else measured
        per_byte_write = seen.write_s / max(seen.write_bytes, 1)
        per_byte_read = seen.read_s / max(seen.read_bytes, 1)
        forward = seen.forward_s * scale
        known = self.fit_layers is not None
        depth = min(self.fit_layers, num_layers) if known else num_layers
        fit_pass = forward * depth / num_layers
        write = per_byte_write * store_bytes
        replay = 2 * per_byte_read * store_bytes * min(REPLAY_POINTS, num_points) / num_points
        later = self.later_fits()
        estimate = {"forward_pass": forward, "fit_pass": fit_pass, "store_write": write, "replay_per_fit": replay}
        if later is None:
            store = replay < fit_pass
            rule = "shared store (write amortised over the sweep's cells): store iff one replay < one fit's pass"
        else:
            store_s, recompute_s = write + later * replay, later * fit_pass
            store = store_s < recompute_s
            rule = f"store iff store write + {later} replay(s) < {later} fit pass(es)"
            estimate.update(store=store_s, recompute=recompute_s)
        depth_note = (f"{depth} of {num_layers} layers" if known else
                      f"all {num_layers} layers (upper bound: the fit's block is not known before selection)")
        self.decide("store" if store else "recompute",
                    f"measured on the first batches (steady forward, flushed writes): {rule}; fit pass: {depth_note}",
                    store_bytes=store_bytes, fit_layers={"priced": depth, "of": num_layers, "known": known},
                    measured={**asdict(measured), "forward_batch_share": 1 / scale},
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


def read_back(paths: list[Path], clock: Callable[[], float], limit: int = PROBE_BYTES) -> tuple[int, float]:
    """Read files as a replay does (``numpy.fromfile``, CRC-32) until ``limit`` bytes are read; (bytes, seconds)."""
    read, started = 0, clock()
    for path in paths:
        data = np.fromfile(path, dtype=np.uint8)
        zlib.crc32(data)
        read += data.nbytes
        if read >= limit:
            break
    return read, clock() - started


class DecidingWriter(Statistic):
    """``auto``: the store writer of a pass whose first batches decide whether there is a store at all.

    It observes every hook point. Before each batch's forward pass (`begin_batch`) it reads the clock. On the
    first batch it opens an `ActivationWriter`, writes the batch, flushes it to the disk and reads part of it
    back, timing each; on the second batch it asks the strategy (`ActivationStrategy.choose`) and either keeps
    writing or deletes what it wrote. Put it first in the pass's statistics, so the forward time
    excludes the others' updates of the batch.
    """

    cacheable = False

    def __init__(self, strategy: ActivationStrategy, slot: ActivationSlot, adapter, batches: list[dict]):
        self.strategy, self.slot, self.adapter, self.batches = strategy, slot, adapter, batches
        self.points = all_hook_points(adapter.num_layers)
        self.writer: ActivationWriter | None = None
        self.decided = False
        self.began = 0.0
        self.first_forward: tuple[float, int] | None = None  # the first batch's forward: seconds, positions
        self.store_probe: tuple[int, float, int, float] | None = None  # write bytes, s; read bytes, s

    @property
    def key(self) -> tuple:
        return (type(self).__name__, str(self.slot.directory))

    def hook_points(self) -> set[HookPoint]:
        return set(self.points)

    def begin_batch(self) -> None:
        if not self.decided:
            synchronize(self.adapter.embeddings().weight.device)  # the previous batch's work is not this one's
            self.began = self.strategy.clock()

    def update(self, batch: BatchActivations) -> None:
        if self.decided:
            if self.writer is not None:
                self.writer.update(batch)
            return
        first = batch.points[self.points[0]]
        synchronize(first.device)
        timed = (self.strategy.clock() - self.began, int(first.shape[0] * first.shape[1]))  # seconds, positions
        if self.first_forward is None:
            self.first_forward = timed
            self._write_first(batch)
            if len(self.batches) > 1:
                return  # decided on the next batch, whose forward pass carries no warm-up
        self.decided = True
        second = timed if len(self.batches) > 1 else None
        priced = min(filter(None, (self.first_forward, second)), key=lambda t: t[0] / t[1])
        costs = ProbeCosts(self.first_forward[0], second and second[0], priced[0], *self.store_probe)
        positions = sum(int(b["input_ids"].numel()) for b in self.batches)
        if not self.strategy.choose(costs, self.slot.store_size(self.adapter, self.batches), len(self.points),
                                    self.adapter.num_layers, scale=positions / priced[1]):
            self.writer.abort()
            self.writer = None
        elif second is not None:
            self.writer.update(batch)

    def _write_first(self, batch: BatchActivations) -> None:
        """Write the first batch into the store, flushed to the disk, and read part of it back (timed)."""
        clock = self.strategy.clock
        self.writer = self.slot.writer(self.adapter, self.batches)  # the slot admits it: `plan` checked
        started = clock()
        self.writer.update(batch)
        self.writer.flush_to_disk()
        write_s = clock() - started
        write_bytes = sum(x.numel() * x.element_size() for x in (batch.points[p] for p in self.points))
        read_bytes, read_s = read_back(self.writer.file_paths(), clock, PROBE_BYTES)
        self.store_probe = (write_bytes, write_s, read_bytes, read_s)

    def commit(self) -> None:
        if self.writer is not None:
            self.writer.commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

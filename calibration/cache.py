"""A disk cache of calibration statistics, shared by every run of a sweep (other processes too).

Entries are keyed by (model fingerprint, calibration-data content hash, statistics code version,
statistic key) and stored as safetensors files whose metadata carries a SHA-256 of the tensor bytes:
a corrupted or truncated file is detected, deleted and recomputed, never used. Writes are atomic.

`gather` is what the pruners call: it answers every requested statistic from the cache where it
can, computes the rest in ONE forward pass, stores them, and serves per-gap similarity requests
from a table of all layer pairs so that any block size reuses the same pass.

Cells of a sweep that run at the same time (joblib workers, SLURM jobs on other nodes) share the
cache: a forward pass for one (model, calibration data) runs under a `depthbench.locking.EntryLock`
in the cache directory, so the first cell computes the statistics and stores the activations while
the others wait and then read them (the lock's docstring states the primitive and its limits).
Replaying a complete activation store needs no lock: a store is immutable once renamed into place.

``DEPTHBENCH_COUNT_FORWARD_PASSES=FILE`` appends one line per calibration forward pass to FILE
(across processes; ``O_APPEND``), which is how tests and benchmarks count passes of a parallel sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterable

import torch

import depthbench
from depthbench import atomic
from depthbench.calibration.activations import STORE_PREFIX, ActivationSlot, remove_writes_of
from depthbench.calibration.strategy import ActivationStrategy, DecidingWriter
from depthbench.locking import STALE_AFTER_S, EntryLock
from depthbench.calibration.statistics import (
    STATISTICS_VERSION, LayerSimilarityTable, PairwiseSimilarity, Statistic, collect, unique,
)

log = logging.getLogger(__name__)

#: Environment variable naming a file that gets one line per calibration forward pass.
PASS_COUNTER_ENV = "DEPTHBENCH_COUNT_FORWARD_PASSES"


def data_fingerprint(batches: list[dict[str, torch.Tensor]]) -> str:
    """Content hash of the tokenised calibration data (ids and masks, in order)."""
    h = hashlib.sha256()
    for batch in batches:
        for name in ("input_ids", "attention_mask"):
            t = batch[name].detach().cpu().contiguous()
            h.update(name.encode() + str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


def _tensor_checksum(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class StatisticsCache:
    def __init__(self, directory: str | Path, model_fingerprint: str, stale_after_s: float = STALE_AFTER_S):
        self.directory = Path(directory)
        self.model_fingerprint = model_fingerprint
        self.stale_after_s = stale_after_s

    def lock(self, data_hash: str) -> EntryLock:
        """The lock under which this model's forward pass on the data with ``data_hash`` runs (the
        statistics it fills and the activations it stores)."""
        key = json.dumps([self.model_fingerprint, data_hash])
        return EntryLock(self.directory / f".pass-{hashlib.sha256(key.encode()).hexdigest()[:32]}.lock",
                         what="the calibration pass of this model and data", stale_after_s=self.stale_after_s)

    def path_for(self, stat: Statistic, data_hash: str) -> Path:
        key = json.dumps([self.model_fingerprint, data_hash, STATISTICS_VERSION, depthbench.__version__,
                          list(map(str, stat.key))])
        return self.directory / f"{stat.key[0]}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def activation_slot(self, data_hash: str, budget_bytes: int) -> ActivationSlot:
        """Where this model's activations on the calibration data with ``data_hash`` are stored."""
        key = json.dumps([self.model_fingerprint, data_hash, STATISTICS_VERSION, depthbench.__version__])
        return ActivationSlot(self.directory / f"{STORE_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:32]}",
                              budget_bytes)

    def load(self, stat: Statistic, data_hash: str) -> bool:
        from safetensors import safe_open

        path = self.path_for(stat, data_hash)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                expected = (f.metadata() or {}).get("sha256")
                state = {name: f.get_tensor(name) for name in f.keys()}
            if expected is None or _tensor_checksum(state) != expected:
                raise ValueError("checksum mismatch")
            stat.load_state(state)
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed
            log.warning("statistics cache entry %s is corrupted (%s); recomputing", path.name, err)
            path.unlink(missing_ok=True)
            return False
        return True

    def save(self, stat: Statistic, data_hash: str) -> Path:
        from safetensors.torch import save_file

        state = stat.state()
        path = self.path_for(stat, data_hash)
        with atomic.file(path) as tmp:
            save_file(state, str(tmp), metadata={"sha256": _tensor_checksum(state),
                                                 "key": json.dumps(list(map(str, stat.key)))})
        return path


def gather(adapter, batches: list[dict[str, torch.Tensor]], statistics: Iterable[Statistic],
           cache: StatisticsCache | None = None, progress: bool = True,
           description: str = "calibration pass", activations: ActivationSlot | None = None,
           strategy: ActivationStrategy | None = None) -> list[Statistic]:
    """Return ``statistics`` filled in, from the cache where possible and one pass for the rest.

    With an ``activations`` slot, the rest is replayed from the stored activations when they exist;
    otherwise the forward pass also stores every layer's activations there (within the slot's
    budget) for the fits that follow, in this run or any later run on the same model and data, or
    not, as ``strategy`` decides (`depthbench.calibration.strategy`; None: store).
    """
    requested = unique(statistics)
    # Both token sets in the same pass where cached: later runs of other methods then need no pass at all.
    sources, fill = similarity_sources(requested, both_token_sets=cache is not None)
    data_hash = data_fingerprint(batches) if cache is not None else ""
    missing = [s for s in sources if not (cache is not None and s.cacheable and cache.load(s, data_hash))]
    if missing and cache is not None and not (activations is not None and activations.complete()):
        with cache.lock(data_hash) as lock:
            if lock.took_over is not None and isinstance(activations, ActivationSlot):
                remove_writes_of(activations.directory, lock.took_over.host, lock.took_over.pid)
            # another cell may have finished this entry while we waited
            missing = [s for s in missing if not (s.cacheable and cache.load(s, data_hash))]
            _compute_and_save(adapter, batches, missing, cache, data_hash, activations, progress, description,
                              strategy)
    else:
        _compute_and_save(adapter, batches, missing, cache, data_hash, activations, progress, description,
                          strategy)
    fill()
    return requested


def similarity_sources(requested: list[Statistic], both_token_sets: bool = False):
    """What a pass computes for ``requested``: every `PairwiseSimilarity` comes from one `LayerSimilarityTable`
    per token set (any gap is a slice of it; ``both_token_sets`` computes the other set's table too), the rest
    as they are. Returns the statistics to feed and a function that fills the pairwise ones from the tables
    once they are fed."""
    pairwise = [s for s in requested if isinstance(s, PairwiseSimilarity)]
    tables = {s.tokens: LayerSimilarityTable(s.num_layers, s.tokens) for s in pairwise}
    if both_token_sets and pairwise:
        depth = pairwise[0].num_layers
        tables = {tokens: tables.get(tokens) or LayerSimilarityTable(depth, tokens) for tokens in ("last", "all")}
    sources = list(tables.values()) + [s for s in requested if not isinstance(s, PairwiseSimilarity)]

    def fill() -> None:
        for stat in pairwise:
            stat.fill_from(tables[stat.tokens])

    return sources, fill


def _compute_and_save(adapter, batches, missing: list[Statistic], cache: StatisticsCache | None, data_hash: str,
                      activations: ActivationSlot | None, progress: bool, description: str,
                      strategy: ActivationStrategy | None) -> None:
    if not missing:
        return
    compute(adapter, batches, missing, activations, progress, description, strategy)
    if cache is not None:
        for stat in missing:
            if stat.cacheable:
                cache.save(stat, data_hash)


def _count_forward_pass(description: str) -> None:
    target = os.environ.get(PASS_COUNTER_ENV)
    if not target:
        return
    line = f"{socket.gethostname()} {os.getpid()} {time.time():.3f} {description}\n".encode()
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def forward_pass(adapter, batches, statistics: list[Statistic], progress: bool, description: str) -> list[Statistic]:
    """`collect` (one forward pass over the calibration batches), counted when the counter is on."""
    _count_forward_pass(description)
    return collect(adapter, batches, statistics, progress=progress, description=description)


def compute(adapter, batches: list[dict[str, torch.Tensor]], statistics: list[Statistic],
            activations: ActivationSlot | None, progress: bool, description: str,
            strategy: ActivationStrategy | None = None) -> None:
    """Fill ``statistics`` by replaying stored activations, else by one forward pass that stores them or not
    as ``strategy`` says (None: store them, within the slot's budget; `depthbench.calibration.strategy`)."""
    if activations is not None:
        store = activations.open()
        if store is not None:
            try:
                store.check(statistics, batches)
            except ValueError as err:  # damaged, or written for other data: recompute
                log.warning("stored activations in %s not used (%s); recomputing", store.directory, err)
                activations.discard()
            else:
                store.replay(statistics, batches, progress, f"{description} (stored activations)")
                if strategy is not None:
                    strategy.replays += 1
                    if not strategy.decision:
                        strategy.decide("store", "replayed a complete store written by an earlier run")
                return
        plan = "store" if strategy is None else strategy.plan(activations, adapter, batches)
        writer = (activations.writer(adapter, batches) if plan == "store" else
                  DecidingWriter(strategy, activations, adapter, batches) if plan == "probe" else None)
        if writer is not None:
            if plan == "probe":  # first: a batch's forward time excludes the other statistics' updates
                fed = [writer, *statistics]
            else:
                fed = [*statistics, writer]
            try:
                _counted_pass(adapter, batches, fed, progress, description, strategy)
            except BaseException:
                writer.abort()
                raise
            writer.commit()
            return
    _counted_pass(adapter, batches, statistics, progress, description, strategy)


def _counted_pass(adapter, batches, statistics: list[Statistic], progress: bool, description: str,
                  strategy: ActivationStrategy | None) -> None:
    if strategy is not None:
        strategy.passes += 1
    forward_pass(adapter, batches, statistics, progress, description)

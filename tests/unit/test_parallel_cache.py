"""Processes sharing one statistics cache: one forward pass in total, a crashed writer taken over."""

from __future__ import annotations

import json
import multiprocessing
import time

import torch

from depthbench.calibration.activations import ActivationSlot
from depthbench.calibration.cache import PASS_COUNTER_ENV, StatisticsCache, data_fingerprint, gather
from depthbench.calibration.statistics import LinearMapMoments, PairwiseSimilarity, collect
from depthbench.locking import OWNER_FILE
from depthbench.modeling.adapters import adapter_for
from tests.helpers import random_batches, build_tiny_llama64


def _requests(adapter):
    L = adapter.num_layers
    return [PairwiseSimilarity(L, 2, "last"), PairwiseSimilarity(L, 1, "all")]


def _cell(cache_dir: str, counter: str, out: str) -> None:
    """One 'cell': score statistics, then a fit's moments (from the stored activations), as ReplaceMe does."""
    import os

    os.environ[PASS_COUNTER_ENV] = counter
    adapter = adapter_for(build_tiny_llama64())
    batches = random_batches(n_batches=3)
    cache = StatisticsCache(cache_dir, model_fingerprint="m", stale_after_s=30)
    slot = cache.activation_slot(data_fingerprint(batches), budget_bytes=1 << 30)
    scores = gather(adapter, batches, _requests(adapter), cache=cache, progress=False, activations=slot)
    (moments,) = gather(adapter, batches, [LinearMapMoments(1, 4, adapter.hidden_size)], cache=cache,
                        progress=False, activations=slot)
    torch.save({"sum_cos": [s.sum_cos for s in scores], "xty": moments.state()}, out)


def _run_cells(tmp_path, n: int):
    ctx = multiprocessing.get_context("spawn")
    counter = tmp_path / "passes"
    procs = [ctx.Process(target=_cell, args=(str(tmp_path / "cache"), str(counter), str(tmp_path / f"out{i}.pt")))
             for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(900)
        assert p.exitcode == 0
    passes = counter.read_text().splitlines() if counter.exists() else []
    return passes, [torch.load(tmp_path / f"out{i}.pt") for i in range(n)]


def _reference():
    adapter = adapter_for(build_tiny_llama64())
    batches = random_batches(n_batches=3)
    scores = collect(adapter, batches, _requests(adapter), progress=False)
    (moments,) = collect(adapter, batches, [LinearMapMoments(1, 4, adapter.hidden_size)], progress=False)
    return [s.sum_cos for s in scores], moments.state()


def _assert_matches_reference(outputs):
    sum_cos, moments = _reference()
    for out in outputs:
        for got, want in zip(out["sum_cos"], sum_cos):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
        for name, want in moments.items():
            torch.testing.assert_close(out["xty"][name], want, rtol=1e-12, atol=1e-10)


def test_three_concurrent_processes_make_one_forward_pass(tmp_path):
    passes, outputs = _run_cells(tmp_path, 3)
    assert len(passes) == 1, passes  # the other two waited, then read statistics and stored activations
    _assert_matches_reference(outputs)
    assert not list((tmp_path / "cache").glob("*.lock")), "a lock was left behind"


def test_a_crashed_writer_on_another_host_is_taken_over_and_its_partial_store_removed(tmp_path):
    cache_dir = tmp_path / "cache"
    batches = random_batches(n_batches=3)
    cache = StatisticsCache(cache_dir, model_fingerprint="m", stale_after_s=30)
    data_hash = data_fingerprint(batches)
    slot = cache.activation_slot(data_hash, budget_bytes=1 << 30)
    # what a job killed mid-write on node7 leaves: its lock (heartbeat stopped 2 minutes ago) and a
    # half-written temporary store
    lock = cache.lock(data_hash).path
    lock.mkdir(parents=True)
    owner = {"host": "node7", "pid": 99, "token": "t", "heartbeat": time.time() - 120}
    (lock / OWNER_FILE).write_text(json.dumps(owner))
    partial = cache_dir / f".{slot.directory.name}.node7.99.abcd"
    partial.mkdir()
    (partial / "residual_0.bin").write_bytes(b"\0" * 100)
    assert not ActivationSlot(slot.directory, slot.budget_bytes).complete()

    passes, outputs = _run_cells(tmp_path, 2)
    assert len(passes) == 1, passes
    _assert_matches_reference(outputs)
    assert not partial.exists() and not lock.exists()
    assert slot.complete()

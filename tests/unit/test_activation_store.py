"""Stored activations: replaying them equals running the model, and fits need no second pass."""

import copy
import os

import numpy as np
import pytest
import torch

import depthbench.calibration.cache as cache_module
from depthbench.calibration.activations import ActivationSlot
from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.cache import StatisticsCache, compute, gather
from depthbench.calibration.spill import LinearMapRows, ResidualPairSequences, SpillFile
from depthbench.calibration.statistics import LayerSimilarityTable, LinearMapMoments, collect
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from tests.helpers import random_batches, build_tiny_llama64


def _statistics(adapter, directory):
    L, d = adapter.num_layers, adapter.hidden_size
    return [LayerSimilarityTable(L, "last"), LayerSimilarityTable(L, "all"), LinearMapMoments(1, 4, d),
            LinearMapRows(2, 5, d, directory), ResidualPairSequences(1, 4, d, 16, directory)]


def _assert_same(replayed, direct):
    for a, b in zip(replayed[:3], direct[:3]):
        assert a.count == b.count
        for name, value in a.state().items():
            torch.testing.assert_close(value, b.state()[name], rtol=0, atol=0, equal_nan=True)
    for a, b in zip(replayed[3:], direct[3:]):
        ra, rb = a.open(), b.open()
        assert ra.keys() == rb.keys()
        for name in ra:
            np.testing.assert_array_equal(ra[name][:], rb[name][:])


@pytest.mark.parametrize("where", ["disk", "memory"])
def test_replay_equals_a_forward_pass(tiny_llama64, tmp_path, counting_collect, where):
    """Every kind of statistic, fed from the stored activations (on disk, or a single run's store kept in memory,
    `MemorySlot`), equals the same statistic fed by the model itself; padded batches (ragged masks) included. A
    store in memory writes nothing to disk."""
    from depthbench.calibration.memory_store import MemorySlot

    adapter = adapter_for(tiny_llama64)
    batches = random_batches(n_batches=3, batch_size=4, seq_len=16)
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches), "the data must contain padding"
    slot = ActivationSlot(tmp_path / "store", budget_bytes=1 << 30) if where == "disk" else MemorySlot(1 << 30)
    compute(adapter, batches, [LayerSimilarityTable(adapter.num_layers, "last")], slot, False, "")
    assert len(counting_collect) == 1 and slot.open() is not None
    assert (where == "disk") == (tmp_path / "store").is_dir() and len(list(tmp_path.iterdir())) == (where == "disk")
    (tmp_path / "replayed").mkdir()
    (tmp_path / "direct").mkdir()
    replayed = _statistics(adapter, tmp_path / "replayed")
    compute(adapter, batches, replayed, slot, False, "")
    assert len(counting_collect) == 1, "replayed, not recomputed"
    direct = collect(adapter, batches, _statistics(adapter, tmp_path / "direct"), progress=False)
    _assert_same(replayed, direct)


def test_store_is_atomic_and_damage_is_detected(tiny_llama64, tmp_path, counting_collect):
    adapter = adapter_for(tiny_llama64)
    batches = random_batches(n_batches=2)
    slot = ActivationSlot(tmp_path / "store", budget_bytes=1 << 30)

    class Boom(LinearMapMoments):
        def update(self, batch):
            raise RuntimeError("killed mid-pass")

    with pytest.raises(RuntimeError):
        compute(adapter, batches, [Boom(1, 3, adapter.hidden_size)], slot, False, "")
    assert list(tmp_path.iterdir()) == [], "an interrupted pass leaves nothing behind"

    reference = compute_moments(adapter, batches, slot)
    assert len(counting_collect) == 2
    victim = slot.directory / "mlp_out_1.bin"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = compute_moments(adapter, batches, slot)
    assert len(counting_collect) == 3, "the damaged store was not replayed but recomputed"
    torch.testing.assert_close(again.A, reference.A, rtol=0, atol=0)
    assert slot.open() is not None, "and stored again"
    # (in use, slots are keyed by the data's content hash; a store whose batches have other shapes
    # is refused by the store itself and replaced)
    other = random_batches(n_batches=3)
    compute_moments(adapter, other, slot)
    assert len(counting_collect) == 4


def compute_moments(adapter, batches, slot):
    stat = LinearMapMoments(1, 3, adapter.hidden_size)
    compute(adapter, batches, [stat], slot, False, "")
    return stat


def test_over_budget_nothing_is_stored(tiny_llama64, tmp_path, counting_collect):
    adapter = adapter_for(tiny_llama64)
    slot = ActivationSlot(tmp_path / "store", budget_bytes=1000)
    compute_moments(adapter, random_batches(n_batches=1), slot)
    assert not slot.directory.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method, options", [
    ("replaceme_ls", {}),
    ("replaceme_cosine", {"epochs": 1}),
    ("llm_streamline", {"max_steps": 2}),
])
def test_fit_needs_no_second_pass_and_equals_the_two_pass_result(method, options, counting_collect):
    """With stored activations, the method runs ONE forward pass; the pruned model is identical to
    the one from the fallback (no store: the fit runs its own pass)."""
    base = build_tiny_llama64(num_layers=6, hidden=16)
    data = CalibrationData(random_batches(n_batches=3, batch_size=8, seq_len=16), 16)
    stored = copy.deepcopy(base)
    build_pruner(method, options).prune(adapter_for(stored), data, 2, progress=False)
    assert len(counting_collect) == 1
    fallback = copy.deepcopy(base)
    pruner, adapter = build_pruner(method, options), adapter_for(fallback)
    with pruner.service(adapter, data, activation_budget_bytes=0, progress=False) as service:
        pruner.prune(adapter, service, 2)
    assert len(counting_collect) == 3, "without the store: the score pass and the fit's own pass"
    with torch.no_grad():
        for batch in data.batches:
            torch.testing.assert_close(stored(**batch).logits, fallback(**batch).logits, rtol=0, atol=0)


def test_a_sweep_shares_one_pass(tmp_path, counting_collect):
    """Every method and ratio on the same model and data: one forward pass in all (the cosine
    method's second block is fitted on the already-pruned model, as the reference does, so it has
    its own pass; single-block fits have none)."""
    base = build_tiny_llama64(num_layers=8, hidden=16)
    data = CalibrationData(random_batches(n_batches=2, batch_size=8, seq_len=16), 16)
    cache = StatisticsCache(tmp_path, model_fingerprint="tiny")
    cells = [(m, o, n) for n in (2, 3) for m, o in [("replaceme_ls", {}), ("replaceme_cosine", {"epochs": 1}),
                                                   ("uidl", {}), ("llm_streamline", {"max_steps": 1}),
                                                   ("shortgpt", {})]]
    for method, options, n in cells:
        pruner, adapter = build_pruner(method, options), adapter_for(copy.deepcopy(base))
        with pruner.service(adapter, data, cache=cache, progress=False) as service:
            pruner.prune(adapter, service, n)
    assert len(counting_collect) == 1


def test_spill_array_reads_equal_the_file(tmp_path):
    spill = SpillFile(tmp_path / "rows.f32", (5,))
    rows = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)
    spill.append(rows[:20])
    spill.append(torch.from_numpy(rows[20:]))
    array = spill.open()
    on_disk = np.fromfile(tmp_path / "rows.f32", dtype=np.float32).reshape(37, 5)
    np.testing.assert_array_equal(on_disk, rows)
    index = np.array([0, 3, 3, 36])
    np.testing.assert_array_equal(array[index], rows[index])
    np.testing.assert_array_equal(array[5:9, 1:3], rows[5:9, 1:3])
    assert array.shape == (37, 5) and len(array) == 37


def test_spill_array_reads_in_pieces_equal_numpy_indexing(tmp_path, monkeypatch):
    """Reads gathered a few rows at a time (`SpillArray.ROWS_PER_DROP`, set to 7 here so that every read spans
    several pieces, a short last one included) return what numpy's own indexing of the same array returns, for
    every kind of key the methods use and a few more."""
    from depthbench.calibration.spill import SpillArray

    monkeypatch.setattr(SpillArray, "ROWS_PER_DROP", 7)
    rows = np.random.default_rng(0).standard_normal((60, 4, 3)).astype(np.float32)
    spill = SpillFile(tmp_path / "rows.f32", (4, 3))
    spill.append(rows)
    array = spill.open()
    index = np.sort(np.random.default_rng(1).choice(60, 25, replace=False))
    mask = np.zeros(60, dtype=bool)
    mask[index] = True
    keys = [7, -1, slice(None), slice(10, 51), slice(50, 3, -4), slice(5, 5), index, index[::-1].copy(),
            list(index), mask, np.array([], dtype=int), (index, slice(0, 2)), (slice(3, 40, 2), 1),
            (index, slice(None), 2), (7, 2), np.array([[1, 2], [3, 4]]), (index[:5], np.arange(5) % 4)]
    for key in keys:
        got, expected = array[key], rows[key]
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(IndexError):  # a mask of another length is refused as numpy refuses it
        array[mask[:-1]]


def test_gather_uses_a_store_in_the_cache(tiny_llama64, tmp_path, counting_collect):
    adapter = adapter_for(tiny_llama64)
    batches = random_batches(n_batches=2)
    cache = StatisticsCache(tmp_path, model_fingerprint="m")
    slot = cache.activation_slot(cache_module.data_fingerprint(batches), 1 << 30)
    gather(adapter, batches, [LayerSimilarityTable(adapter.num_layers, "last")], cache=cache, progress=False,
           activations=slot)
    other = cache.activation_slot(cache_module.data_fingerprint(random_batches(n_batches=2, seed=5)), 1 << 30)
    assert slot.directory.is_dir() and other.directory != slot.directory
    moments = gather(adapter, batches, [LinearMapMoments(2, 5, adapter.hidden_size)], cache=cache, progress=False,
                     activations=slot)[0]
    assert len(counting_collect) == 1
    direct = collect(adapter, batches, [LinearMapMoments(2, 5, adapter.hidden_size)], progress=False)[0]
    torch.testing.assert_close(moments.B, direct.B, rtol=0, atol=0)


def test_a_killed_writers_temporary_store_is_removed_by_the_next_writer(tiny_llama64, tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    slot = ActivationSlot(tmp_path / "store", budget_bytes=1 << 30)
    host = socket.gethostname()
    abandoned = tmp_path / f".store.{host}.{dead.pid}.abc"
    running = tmp_path / f".store.{host}.{os.getpid()}.def"  # a live writer (this process)
    elsewhere = tmp_path / f".store.other-host.{dead.pid}.ghi"  # cannot be checked from here
    for d in (abandoned, running, elsewhere):
        d.mkdir()
        (d / "residual_0.bin").write_bytes(b"\0" * 64)
    compute_moments(adapter_for(tiny_llama64), random_batches(n_batches=1), slot)
    assert not abandoned.exists()
    assert running.exists() and elsewhere.exists()
    assert slot.open() is not None


@pytest.mark.parametrize("cache, kept", [({}, False), ({"keep_activations": True}, True), ({"dir": "elsewhere"}, True)])
def test_an_ended_multirun_deletes_only_its_stored_activations(tmp_path, cache, kept):
    from omegaconf import OmegaConf

    from depthbench.experiments.sweep_callbacks import DropStoredActivations

    statistics = tmp_path / "sweep" / ".cache" / "statistics"
    stores = [statistics / "activations-abc", statistics / ".activations-abc.host.123.tmp"]
    for store in stores:
        store.mkdir(parents=True)
        (store / "residual_0.bin").write_bytes(b"\0" * 1000)
    kept_file = statistics / "LayerSimilarityTable-x.safetensors"
    kept_file.write_bytes(b"statistics")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}, "cache": cache})
    DropStoredActivations().on_multirun_end(config)
    assert kept_file.read_bytes() == b"statistics"
    assert [store.exists() for store in stores] == [kept, kept]


def test_an_interrupted_pass_keeps_no_memory_store(tiny_llama64):
    from depthbench.calibration.memory_store import MemorySlot

    adapter = adapter_for(tiny_llama64)

    class Boom(LinearMapMoments):
        def update(self, batch):
            raise RuntimeError("killed mid-pass")

    interrupted = MemorySlot(budget_bytes=1 << 30)
    with pytest.raises(RuntimeError):
        compute(adapter, random_batches(n_batches=2), [Boom(1, 3, adapter.hidden_size)], interrupted, False, "")
    assert not interrupted.complete()


def test_a_single_runs_store_is_in_memory_when_it_fits_else_on_disk(tiny_llama64, monkeypatch):
    """`open_service` keeps a single run's store in memory within ``memory_budget_bytes`` and falls back to a
    temporary directory on disk beyond it; a sweep's shared store is never in memory."""
    import tempfile

    from depthbench.calibration.activations import store_bytes
    from depthbench.calibration.service import open_service

    adapter = adapter_for(tiny_llama64)
    data = CalibrationData(random_batches(n_batches=2), 16)
    size = store_bytes(adapter.num_layers, adapter.hidden_size, torch.float64, data.batches)
    with open_service(adapter, data, keep_activations=False, memory_budget_bytes=size, progress=False) as service:
        assert service.activations.where == "memory"
    with open_service(adapter, data, keep_activations=False, memory_budget_bytes=size - 1, progress=False) as service:
        assert service.activations.where == "disk"
        assert str(service.activations.directory).startswith(tempfile.gettempdir())

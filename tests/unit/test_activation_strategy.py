"""Store or recompute (calibration/strategy.py): a device with a cheap forward pass (simulated by the injectable
cost model) writes no store and prunes the same; an expensive one (a CPU) keeps one pass; a sweep keeps one
pass where the store pays; the explicit option and the budget override ``auto``. Passes are counted by a hook on
the model's forward, not read from the service's own counters."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import types
import zlib

import pytest
import torch

import depthbench.calibration.strategy as strategy_module
from depthbench.calibration.activations import ActivationWriter, all_hook_points, store_bytes
from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.cache import StatisticsCache
from depthbench.calibration.strategy import REPLAY_POINTS, ActivationStrategy
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_model, random_batches, tiny_llama_config

N_BATCHES = 3


def cheap_forward(measured):
    """A GPU-like device: the forward pass costs a thousandth of the store's write of the same batch."""
    return dataclasses.replace(measured, forward_s=measured.write_s * 1e-3)


def expensive_forward(measured):
    """A CPU-like device: the forward pass costs a thousand times the store's write of the same batch."""
    return dataclasses.replace(measured, forward_s=measured.write_s * 1e3 + 1.0)


@pytest.fixture
def base():
    return build_tiny_model(tiny_llama_config(num_layers=6, hidden=16), dtype=torch.float64)


@pytest.fixture
def data():
    return CalibrationData(random_batches(n_batches=N_BATCHES, batch_size=8, seq_len=16), 16)


@pytest.fixture
def writers(monkeypatch):
    """Every store committed (an `ActivationWriter` that wrote a whole store), wherever it is written from.
    ``auto`` opens a writer for the first batch in any case (its write is timed); what counts is what it keeps."""
    committed = []
    original = ActivationWriter.commit

    def counted(self):
        committed.append(self.directory)
        original(self)

    monkeypatch.setattr(ActivationWriter, "commit", counted)
    return committed


class FakeTime:
    """A clock that moves only when the simulated device or disk spends time: the model's forward pass (``cold``
    seconds on its first call, ``steady`` after), ``fsync`` (``flush`` seconds per file: a disk slower than the
    page cache, where the ``write`` calls themselves cost nothing) and the read-back's CRC (``read`` per file)."""

    def __init__(self, monkeypatch, model, *, cold: float, steady: float, flush: float, read: float = 0.0):
        self.now, self.calls = 0.0, 0
        model.register_forward_pre_hook(lambda module, args, kwargs: self._forward(cold, steady), with_kwargs=True)
        real_fsync, real_crc32 = os.fsync, zlib.crc32
        monkeypatch.setattr(os, "fsync", lambda fd: (self._spend(flush), real_fsync(fd))[1])
        slow_crc32 = lambda data, *crc: (self._spend(read), real_crc32(data, *crc))[1]  # noqa: E731
        monkeypatch.setattr(strategy_module, "zlib", types.SimpleNamespace(crc32=slow_crc32))

    def __call__(self) -> float:
        return self.now

    def _spend(self, seconds: float) -> None:
        self.now += seconds

    def _forward(self, cold: float, steady: float) -> None:
        self._spend(cold if self.calls == 0 else steady)
        self.calls += 1


def model_calls(model) -> list:
    """A list that gets one entry per call of the model's forward (one per batch of a calibration pass)."""
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    return calls


def prune(base, data, strategy, *, method="replaceme_ls", options=None, n=2, cache=None, keep=True, budget=1 << 30,
          timed=None):
    """One prune of a copy of ``base``; (pruned model, result, forward calls, the strategy's record). ``timed``:
    a function of the copy that returns the strategy's clock (`FakeTime`)."""
    model = copy.deepcopy(base)
    calls = model_calls(model)
    if timed is not None:
        strategy.clock = timed(model)
    pruner, adapter = build_pruner(method, options or {}), adapter_for(model)
    with pruner.service(adapter, data, cache=cache, keep_activations=keep, activation_budget_bytes=budget,
                        progress=False, strategy=strategy) as service:
        result = pruner.prune(adapter, service, n)
    return model, result, len(calls), strategy.record()


def stores_in(directory) -> list:
    return [p for p in directory.iterdir() if "activations-" in p.name]


def assert_same_prune(a, b, exact: bool = False) -> None:
    """Same removed layers and the same weights (the folded transform included): bit for bit, or to float64
    tolerance where one side recomputed the activations the other stored."""
    (model_a, result_a), (model_b, result_b) = a, b
    assert result_a.selection.removed_layers == result_b.selection.removed_layers
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], **tolerance)


def test_a_cheap_forward_pass_writes_no_store_and_prunes_the_same(base, data, tmp_path, writers):
    """(a) A single ReplaceMe-LS run on a device whose forward pass is cheap: no store is written (no writer is
    opened, nothing is left in the cache directory), the fit runs its own pass, and the removed layers and the
    folded transform equal the store path's."""
    cheap = ActivationStrategy("auto", fits=1, cost_model=cheap_forward)
    recomputed = prune(base, data, cheap, cache=StatisticsCache(tmp_path / "cheap", "tiny"))
    assert writers == [] and stores_in(tmp_path / "cheap") == []
    assert recomputed[2] == 2 * N_BATCHES, "the score pass and the fit's own pass"
    record = recomputed[3]
    assert record["ran"] == "recompute" and record["strategy"] == "auto"
    assert record["estimated_s"]["store"] > record["estimated_s"]["recompute"]
    assert record["forward_passes"] == 2 and record["replays"] == 0

    stored = prune(base, data, ActivationStrategy("store", fits=1), cache=StatisticsCache(tmp_path / "store", "tiny"))
    assert len(writers) == 1 and stored[2] == N_BATCHES and stored[3]["replays"] == 1
    assert_same_prune(recomputed[:2], stored[:2])
    assert recomputed[1].replacement["blocks"][0]["block"] == stored[1].replacement["blocks"][0]["block"]


def test_an_expensive_forward_pass_keeps_one_pass(base, data, writers):
    """(b) The CPU case: the measured decision stores, and the run makes exactly one calibration pass (the fit
    replays the store); the result equals the explicit store path's."""
    expensive = ActivationStrategy("auto", fits=1, cost_model=expensive_forward)
    auto = prune(base, data, expensive, keep=False)
    assert auto[2] == N_BATCHES and len(writers) == 1
    assert auto[3]["ran"] == "store" and auto[3]["replays"] == 1 and auto[3]["forward_passes"] == 1
    assert_same_prune(auto[:2], prune(base, data, ActivationStrategy("store"), keep=False)[:2], exact=True)


def test_a_sweep_keeps_one_pass_where_the_store_pays(base, data, tmp_path, writers):
    """(c) Several methods and ratios on one model and data sharing a cache (each cell with its own strategy, a
    store any later cell may replay): one forward pass in all on a device where the store pays."""
    cache = StatisticsCache(tmp_path, model_fingerprint="tiny")
    calls = 0
    cells = [("replaceme_ls", {}), ("uidl", {}), ("llm_streamline", {"max_steps": 1}), ("shortgpt", {}),
             ("replaceme_cosine", {"epochs": 1})]
    records = []
    for (method, options), n in itertools.product(cells, (2, 3)):
        strategy = ActivationStrategy("auto", fits=None, cost_model=expensive_forward)
        calls += prune(base, data, strategy, method=method, options=options, n=n, cache=cache)[2]
        records.append(strategy.record())
    assert calls == N_BATCHES and len(writers) == 1
    assert records[0]["ran"] == "store" and records[0]["later_fits"] == "any"
    assert sum(r["replays"] for r in records) == 6, "every fit of ReplaceMe and Streamline replayed the store"


def test_a_sweep_on_a_cheap_device_stores_nothing(base, data, tmp_path, writers):
    """The same sharing on a device where one replay costs more than a forward pass: no store; each fit runs
    its own pass (statistics still come from the cache)."""
    cache = StatisticsCache(tmp_path, model_fingerprint="tiny")

    def slow_reads(measured):
        return dataclasses.replace(measured, forward_s=measured.read_s * 1e-3)

    calls = [prune(base, data, ActivationStrategy("auto", fits=None, cost_model=slow_reads), n=n, cache=cache)[2]
             for n in (2, 3)]
    assert writers == [] and calls == [2 * N_BATCHES, N_BATCHES]


def test_the_explicit_strategy_and_the_budget_override_auto(base, data, writers):
    """(d) ``store`` stores on a device where auto would not; ``recompute`` recomputes where auto would store;
    a budget below the store's size recomputes whatever the measurement."""
    forced_store = prune(base, data, ActivationStrategy("store", cost_model=cheap_forward), keep=False)
    assert forced_store[2] == N_BATCHES and len(writers) == 1
    assert forced_store[3]["ran"] == "store" and "activation_strategy=store" in forced_store[3]["reason"]

    forced_recompute = prune(base, data, ActivationStrategy("recompute", cost_model=expensive_forward), keep=False)
    assert forced_recompute[2] == 2 * N_BATCHES and len(writers) == 1
    assert forced_recompute[3]["ran"] == "recompute" and "measured" not in forced_recompute[3]

    over_budget = prune(base, data, ActivationStrategy("auto", cost_model=expensive_forward), keep=False, budget=0)
    assert over_budget[2] == 2 * N_BATCHES and len(writers) == 1
    assert "cache.activations_gb" in over_budget[3]["reason"]


LAYERS, HIDDEN = 6, 16
POINTS = len(all_hook_points(LAYERS))  # files of the store: one per hook point
BATCH_BYTES = POINTS * 8 * 16 * HIDDEN * 8  # the first batch (8 x 16 positions, float64) in the store


def test_the_record_holds_the_numbers_behind_the_choice(base, data, monkeypatch, tmp_path):
    """The estimates follow from the simulated costs as the documented rule says: the first batch's forward (with
    its warm-up) is recorded, not priced; the second's is; the first batch's write is priced with its flush, the
    read-back per byte read."""
    strategy = ActivationStrategy("auto", fits=1)
    timed = lambda model: FakeTime(monkeypatch, model, cold=100.0, steady=1.0, flush=0.001, read=0.002)  # noqa: E731
    record = prune(base, data, strategy, keep=False, timed=timed)[3]
    size = store_bytes(LAYERS, HIDDEN, torch.float64, data.batches)
    assert record["store_bytes"] == size == N_BATCHES * BATCH_BYTES
    assert record["measured"] == {"cold_forward_s": 100.0, "second_forward_s": pytest.approx(1.0),
                                  "forward_s": pytest.approx(1.0),
                                  "write_bytes": BATCH_BYTES,
                                  "write_s": pytest.approx(POINTS * 0.001), "read_bytes": BATCH_BYTES,
                                  "read_s": pytest.approx(POINTS * 0.002),
                                  "forward_batch_share": pytest.approx(1 / N_BATCHES)}
    assert record["fit_layers"] == {"priced": LAYERS, "of": LAYERS, "known": False}
    estimate = record["estimated_s"]
    assert estimate["forward_pass"] == pytest.approx(N_BATCHES * 1.0), "the steady batch, not the cold one"
    assert estimate["fit_pass"] == estimate["forward_pass"], "unknown depth: the full pass (upper bound)"
    assert estimate["store_write"] == pytest.approx(N_BATCHES * POINTS * 0.001)
    assert estimate["replay_per_fit"] == pytest.approx(2 * N_BATCHES * REPLAY_POINTS * 0.002)
    assert estimate["store"] == pytest.approx(estimate["store_write"] + estimate["replay_per_fit"])
    assert estimate["recompute"] == estimate["fit_pass"]
    assert record["ran"] == "store" and record["forward_passes"] == 1


def test_a_second_batch_slowed_by_other_jobs_is_not_priced(base, data, monkeypatch):
    """Both batches' times are upper bounds of the steady one (warm-up, or other jobs on a shared machine): the
    cheaper is priced. Here the second batch is the slower (3 s against 2 s)."""
    strategy = ActivationStrategy("auto", fits=1)
    timed = lambda model: FakeTime(monkeypatch, model, cold=2.0, steady=3.0, flush=0.001)  # noqa: E731
    record = prune(base, data, strategy, keep=False, timed=timed)[3]
    measured = record["measured"]
    assert (measured["cold_forward_s"], measured["second_forward_s"]) == (pytest.approx(2.0), pytest.approx(3.0))
    assert measured["forward_s"] == pytest.approx(2.0)
    assert record["estimated_s"]["forward_pass"] == pytest.approx(N_BATCHES * 2.0)


@pytest.mark.parametrize("flush, ran", [(1.0, "recompute"), (0.01, "store")])
def test_a_store_fast_into_the_page_cache_but_slow_to_the_disk_recomputes(base, data, monkeypatch, writers, flush, ran):
    """The ``write`` calls cost nothing (the page cache takes them); flushing to the disk costs ``flush`` s per
    file. The decision prices the flush: a slow disk recomputes (nothing kept, the first batch's files deleted),
    a fast one stores. Forward: 1 s per batch after a 5 s first batch."""
    strategy = ActivationStrategy("auto", fits=1)
    timed = lambda model: FakeTime(monkeypatch, model, cold=5.0, steady=1.0, flush=flush)  # noqa: E731
    _, _, calls, record = prune(base, data, strategy, keep=False, timed=timed)
    assert record["measured"]["write_s"] == pytest.approx(POINTS * flush), "the flush is timed"
    assert record["ran"] == ran
    assert calls == (2 if ran == "recompute" else 1) * N_BATCHES and len(writers) == (ran == "store")
    assert record["estimated_s"]["store_write"] == pytest.approx(N_BATCHES * POINTS * flush)


@pytest.mark.parametrize("fit_layers, ran", [(None, "store"), (LAYERS, "store"), (1, "recompute")])
def test_a_partial_fit_pass_is_priced_at_its_depth(base, data, monkeypatch, writers, fit_layers, ran):
    """A fit whose pass runs ``fit_layers`` of the 6 layers is priced at that share of the forward pass (3 s): the
    store (0.78 s to write) beats the full pass, not a pass of one layer (0.5 s)."""
    strategy = ActivationStrategy("auto", fits=1, fit_layers=fit_layers)
    timed = lambda model: FakeTime(monkeypatch, model, cold=1.0, steady=1.0, flush=0.02)  # noqa: E731
    record = prune(base, data, strategy, keep=False, timed=timed)[3]
    depth = LAYERS if fit_layers is None else fit_layers
    assert record["fit_layers"] == {"priced": depth, "of": LAYERS, "known": fit_layers is not None}
    assert record["estimated_s"]["fit_pass"] == pytest.approx(N_BATCHES * 1.0 * depth / LAYERS)
    assert record["estimated_s"]["store_write"] == pytest.approx(N_BATCHES * POINTS * 0.02)
    assert record["ran"] == ran and len(writers) == (ran == "store")


def test_the_explicit_options_override_the_measured_decision(base, data, monkeypatch, writers):
    """Where the simulated disk makes ``auto`` recompute, ``store`` still stores (and times nothing)."""
    timed = lambda model: FakeTime(monkeypatch, model, cold=1.0, steady=1.0, flush=1.0)  # noqa: E731
    record = prune(base, data, ActivationStrategy("store"), keep=False, timed=timed)[3]
    assert record["ran"] == "store" and "measured" not in record and len(writers) == 1


def test_no_later_fit_means_no_store(base, data, tmp_path, writers):
    """When the score statistics come from the cache, the fit's own pass is the run's last: auto stores nothing
    (a single run's temporary store would serve no one)."""
    cache = StatisticsCache(tmp_path, model_fingerprint="tiny")
    prune(base, data, ActivationStrategy("recompute"), cache=cache)  # fills the statistics cache, no store
    # another ratio: the score statistics (every gap) are cached, the fit's moments (another block) are not
    again = prune(base, data, ActivationStrategy("auto", fits=1, cost_model=expensive_forward), n=3, cache=cache)
    assert writers == [] and again[2] == N_BATCHES
    assert again[3]["ran"] == "recompute" and "no later pass" in again[3]["reason"]


def test_a_method_that_fits_nothing_records_none(base, data):
    record = prune(base, data, ActivationStrategy("auto"), method="uidl", keep=False)[3]
    assert record["ran"] == "none" and record["forward_passes"] == 1


def test_the_setting_is_checked_once_with_the_allowed_values():
    from omegaconf import OmegaConf

    from depthbench.settings import CacheSettings
    from tests.helpers import compose as _compose

    yaml = _compose().cache
    assert CacheSettings.from_config(yaml).activation_strategy == "auto"
    with pytest.raises(ConfigError, match=r"cache.activation_strategy='sometimes'; allowed: auto, store, recompute"):
        CacheSettings.from_config({**OmegaConf.to_container(yaml), "activation_strategy": "sometimes"})
    with pytest.raises(ValueError, match="allowed: auto, store, recompute"):
        ActivationStrategy("never")


@pytest.mark.parametrize("setting,memory_gb", [("recompute", "auto"), ("auto", "auto"), ("auto", 0)])
def test_the_pipeline_records_which_strategy_ran_and_why(base, data, tmp_path, setting, memory_gb):
    """The pipeline's prune step builds the strategy from ``cache.activation_strategy`` and puts its record in
    the outcome that result.json and pruning.json carry (``calibration.activations``). A single run's store that
    fits ``cache.activations_memory_gb`` is kept in memory (one pass, nothing weighed); with no memory for it, auto
    weighs the disk store's measured costs."""
    from depthbench.experiments.pipeline import (CheckedRun, LoadedRun, RunContext, RunInputs, prune as prune_step,
                                                 run_outcome)
    from tests.helpers import compose as _compose

    ctx = RunContext(_compose("pruner=replaceme_ls", f"cache.activation_strategy={setting}",
                              f"cache.activations_memory_gb={memory_gb}", "logger=none"), tmp_path)
    model = copy.deepcopy(base)
    calls = model_calls(model)
    checked = CheckedRun(0.1, build_pruner("replaceme_ls", {}), None, "")
    # its own statistics cache entries (the fingerprint; the cache is per session)
    loaded = LoadedRun(None, adapter_for(model), n_remove=2, fingerprint=str(tmp_path))
    inputs = RunInputs(None, data)
    record = run_outcome(ctx, inputs, prune_step(ctx, checked, inputs, loaded))["calibration"]["activations"]
    assert record["strategy"] == setting and record["later_fits"] == 1
    assert record["forward_passes"] * N_BATCHES == len(calls)
    if setting == "recompute":
        assert record["ran"] == "recompute" and len(calls) == 2 * N_BATCHES
    elif memory_gb == "auto":  # the tiny model's store fits in memory: kept there, one pass, nothing measured
        assert record["ran"] == "store" and record["where"] == "memory" and "measured" not in record
        assert len(calls) == N_BATCHES and record["replays"] == 1
    else:  # the tiny model's real costs decide; whichever ran, the numbers behind it are recorded
        assert record["ran"] in ("store", "recompute") and set(record["measured"]) >= {"forward_s", "write_s"}
        assert len(calls) == (N_BATCHES if record["ran"] == "store" else 2 * N_BATCHES)

"""Training rows on the model's device (`DeviceRows`) or in files (`DiskRows`): the same values, so the same
trained replacement; which one runs follows what the activation store leaves of the memory budget."""

import numpy as np
import pytest
import torch

from depthbench.calibration import spill
from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.memory_store import MemorySlot
from depthbench.calibration.service import open_service
from depthbench.calibration.spill import DeviceRowFile, LinearMapRows, ResidualPairSequences
from depthbench.calibration.statistics import collect
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_model, random_batches, tiny_llama_config

GIB = 1024**3
METHODS = {
    "replaceme_cosine": {"lr": 3e-3, "epochs": 2, "batch_size": 32},
    "llm_streamline": {"lr": 3e-3, "max_steps": 6, "warmup_steps": 1, "batch_size": 4, "holdout": 0.25,
                       "eval_every": 2},
}


def no_files(monkeypatch):
    """Any attempt to write a spill file fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a spill file was created for rows that fit in memory")

    monkeypatch.setattr(spill.SpillFile, "__init__", refuse)


def pruned(method: str, memory_budget_bytes: int, spill_dir):
    model = build_tiny_model(tiny_llama_config(num_layers=6), seed=3)
    data = CalibrationData(random_batches(n_batches=3, batch_size=4, seed=3), 16)
    pruner = build_pruner(method, {**METHODS[method], "spill_dir": str(spill_dir)})
    adapter = adapter_for(model)
    with pruner.service(adapter, data, progress=False, memory_budget_bytes=memory_budget_bytes) as service:
        result = pruner.prune(adapter, service, 2)
    return model, result.replacement


def fit_records(method: str, replacement: dict) -> list[dict]:
    return replacement["blocks"] if method == "replaceme_cosine" else [replacement]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rows_in_memory_train_the_same_replacement_as_rows_in_files(method, tmp_path, monkeypatch):
    on_disk, disk_info = pruned(method, 0, tmp_path)
    assert list(tmp_path.iterdir()) == []  # the spill files are gone
    no_files(monkeypatch)
    in_memory, memory_info = pruned(method, GIB, tmp_path)
    assert [f["training_rows"] for f in fit_records(method, disk_info)] == ["disk"]
    assert [f["training_rows"] for f in fit_records(method, memory_info)] == ["memory"]
    # the same float32 rows in the same order: every weight of the pruned model bit for bit
    disk_state, memory_state = on_disk.state_dict(), in_memory.state_dict()
    assert disk_state.keys() == memory_state.keys()
    for name in disk_state:
        assert torch.equal(disk_state[name], memory_state[name]), name
    for disk_fit, memory_fit in zip(fit_records(method, disk_info), fit_records(method, memory_info)):
        assert memory_fit["convergence"] == disk_fit["convergence"]
        assert memory_fit["training_seconds"] > 0


def statistic_bytes(stat) -> int:
    return sum(f._buffer.numel() * f._buffer.element_size() for f in
               (stat.files.values() if isinstance(stat, LinearMapRows) else (stat.inputs, stat.targets, stat.mask)))


@pytest.mark.parametrize("kind", ["rows", "sequences"])
def test_rows_kept_on_the_device_equal_the_activations(kind):
    """The kept rows against the model's own hidden states (an independent forward pass), and the bytes the
    method asks the budget for against the buffers actually allocated."""
    model = build_tiny_model(tiny_llama_config(num_layers=6), seed=4)
    batches = random_batches(n_batches=3, batch_size=4, seed=4)
    data = CalibrationData(batches, 16)
    adapter = adapter_for(model)
    storage = spill.DeviceRows("cpu")
    if kind == "rows":
        stat = LinearMapRows(1, 4, adapter.hidden_size, storage, capacity=data.n_tokens)
        expected_bytes = LinearMapRows.storage_bytes(data.n_tokens, adapter.hidden_size)
    else:
        stat = ResidualPairSequences(1, 4, adapter.hidden_size, 16, storage, capacity=data.n_samples)
        expected_bytes = ResidualPairSequences.storage_bytes(data.n_samples, 16, adapter.hidden_size)
    (stat,) = collect(adapter, batches, [stat], progress=False)
    assert statistic_bytes(stat) == expected_bytes
    rows = stat.open()
    with torch.no_grad():
        hidden = [model(**b, output_hidden_states=True).hidden_states for b in batches]
    masks = [b["attention_mask"].bool() for b in batches]
    if kind == "rows":
        h4 = torch.cat([h[4][m] for h, m in zip(hidden, masks)])
        assert rows["target"].shape == (data.n_tokens, adapter.hidden_size)
        torch.testing.assert_close(rows["target"], h4.to(torch.float32), rtol=0, atol=0)
    else:
        h1 = torch.cat([h[1] * m[..., None] for h, m in zip(hidden, masks)])
        torch.testing.assert_close(rows["input"][:, :h1.shape[1]], h1, rtol=0, atol=0)
        assert torch.equal(rows["mask"][:, :h1.shape[1]], torch.cat(masks).to(torch.uint8))


def test_a_store_in_memory_leaves_the_rest_of_the_budget_to_the_rows():
    model = build_tiny_model(tiny_llama_config(num_layers=6), seed=5)
    data = CalibrationData(random_batches(n_batches=3, batch_size=4, seed=5), 16)
    adapter = adapter_for(model)
    store = MemorySlot(GIB).store_size(adapter, data.batches)
    rows = LinearMapRows.storage_bytes(data.n_tokens, adapter.hidden_size)
    for budget, where in ((store + rows, "memory"), (store + rows - 1, "disk"), (rows, "memory")):
        # a budget of just the rows does not admit the store: it goes to disk and leaves the rows the whole budget
        with open_service(adapter, data, progress=False, keep_activations=False, memory_budget_bytes=budget) as service:
            with service.rows_storage(rows) as storage:
                assert storage.where == where, (budget, store, rows)
    with open_service(adapter, data, progress=False, memory_budget_bytes=0) as service:
        with service.rows_storage(rows) as storage:
            assert storage.where == "disk"


def test_device_rows_refuse_what_they_cannot_hold():
    rows = DeviceRowFile("m", (3,), torch.float32, "cpu", capacity=4)
    with pytest.raises(ValueError, match=r"no rows were kept"):
        rows.open()
    rows.append(np.ones((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"rows of shape \(2,\), expected \(3,\)"):
        rows.append(torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"5 rows exceed the 4 allocated"):
        rows.append(torch.ones(2, 3))
    rows.append(torch.full((1, 3), 2.0))
    assert torch.equal(rows.open(), torch.tensor([[1.0] * 3] * 3 + [[2.0] * 3]))


@pytest.mark.parametrize("memory_gb,where", [("auto", "memory"), (0, "disk")])
def test_the_pipeline_records_where_the_rows_were(tmp_path, memory_gb, where):
    """Through the pipeline's prune step: ``cache.activations_memory_gb`` (auto: half the available memory, which
    a tiny model's store and rows fit) decides, and the pruning record names where the rows were."""
    from depthbench.experiments.pipeline import CheckedRun, LoadedRun, RunContext, RunInputs, prune as prune_step
    from tests.helpers import compose

    ctx = RunContext(compose("pruner=replaceme_cosine", f"cache.activations_memory_gb={memory_gb}", "logger=none"),
                     tmp_path)
    model = build_tiny_model(tiny_llama_config(num_layers=6), seed=6)
    checked = CheckedRun(0.1, build_pruner("replaceme_cosine", {"epochs": 1}), None, "")
    loaded = LoadedRun(None, adapter_for(model), n_remove=2, fingerprint=str(tmp_path))
    inputs = RunInputs(None, CalibrationData(random_batches(n_batches=2, batch_size=4, seed=6), 16))
    outcome = prune_step(ctx, checked, inputs, loaded)
    assert [fit["training_rows"] for fit in outcome.result.to_dict()["replacement"]["blocks"]] == [where]

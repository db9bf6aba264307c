"""Shared fixtures (plain helpers that tests import are in tests/helpers.py and tests/families.py)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import build_tiny_llama64, build_tiny_model, tiny_llama_config
# Re-exported: branches written before tests/helpers.py import it from here.
from tests.helpers import random_batches  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def allocator_as_a_run_sets_it():
    """The whole suite runs with the C allocator's settings that every pipeline run applies (depthbench.allocator),
    not with the defaults until the first test that happens to call the pipeline."""
    from depthbench.allocator import keep_freed_memory

    keep_freed_memory()


@pytest.fixture(autouse=True, scope="session")
def private_depthbench_cache(tmp_path_factory):
    """Tests never read or write the user's cache (~/.cache/depthbench): a result cached by an older
    checkout could otherwise stand in for a fresh computation. CLI subprocesses inherit the variable."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DEPTHBENCH_CACHE", str(tmp_path_factory.mktemp("depthbench-cache")))
    yield
    patch.undo()


@pytest.fixture
def tiny_llama():
    return build_tiny_model(tiny_llama_config())


@pytest.fixture
def tiny_llama64():
    """A float64 tiny Llama, for comparisons against float64 references."""
    return build_tiny_llama64()


@pytest.fixture
def counting_collect(monkeypatch):
    """Records every forward pass run through `depthbench.calibration.cache` (replays of stored activations are
    not forward passes); each entry is the list of statistics that pass fed."""
    import depthbench.calibration.cache as cache_module
    from depthbench.calibration.statistics import collect

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return collect(*args, **kwargs)

    monkeypatch.setattr(cache_module, "collect", counted)
    return calls


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (tiny models: thread start-up costs more than it saves)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task_manager():
    """lm-eval's task manager with the project's offline tasks (built once per module: it indexes every task)."""
    from depthbench.evaluation.lm_eval_runner import _task_manager

    return _task_manager()

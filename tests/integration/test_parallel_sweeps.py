"""Cells of one sweep running at the same time (issue 18): through hydra-joblib-launcher and through
hydra-submitit-launcher's local executor (the SLURM launcher's machinery, jobs as separate processes),
sharing the sweep's cache. One calibration forward pass in total (counted across processes through
``DEPTHBENCH_COUNT_FORWARD_PASSES``), the same results as the sequential sweep, and a clean resume
after a job is killed while it holds the pass's lock and writes the activation store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import needs_offline_packages, run_cli

pytestmark = [pytest.mark.integration, needs_offline_packages]

# Two ReplaceMe-LS cells: each needs the score statistics and, after selection, the least-squares
# moments of its own block, read back from the activations the one pass stored.
CELLS = ["pruner=replaceme_ls", "ratio=0.1,0.2"]
# float32: the parallel cells run with fewer threads each than the sequential ones, and in bfloat16 (model.dtype=auto
# on a CPU with AMX / AVX512-BF16) another reduction order moves the perplexity in the third digit
FAST = ["scale=fast", "benchmark=none", "logger=none", "save_model=false", "efficiency.enabled=false",
        "evaluation.fidelity.enabled=false", "progress=false", "model.dtype=float32"]
PASS_COUNTER = "DEPTHBENCH_COUNT_FORWARD_PASSES"


def _sweep(sweep: Path, cwd: Path, *launcher: str, counter: Path | None = None) -> subprocess.CompletedProcess:
    if counter is not None:
        os.environ[PASS_COUNTER] = str(counter)
    try:
        proc = run_cli("-m", *CELLS, *FAST, *launcher, f"hydra.sweep.dir={sweep}", cwd=cwd, timeout=1800)
    finally:
        os.environ.pop(PASS_COUNTER, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _outcomes(sweep: Path) -> dict[float, dict]:
    records = [json.loads(p.read_text()) for p in sweep.rglob("result.json")]
    return {r["ratio"]: {"removed": r["pruning"]["removed_layers"],
                         "base_ppl": r["metrics"]["base"]["heldout_perplexity"]["perplexity"],
                         "pruned_ppl": r["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]} for r in records}


def _passes(counter: Path) -> list[str]:
    return counter.read_text().splitlines() if counter.exists() else []


def _assert_same(parallel: dict, sequential: dict) -> None:
    assert set(parallel) == set(sequential) == {0.1, 0.2}
    for ratio, want in sequential.items():
        got = parallel[ratio]
        assert got["removed"] == want["removed"]
        assert got["base_ppl"] == pytest.approx(want["base_ppl"], rel=1e-6)
        assert got["pruned_ppl"] == pytest.approx(want["pruned_ppl"], rel=1e-6)


def _no_leftovers(sweep: Path) -> None:
    cache = sweep / ".cache"
    assert not [p for p in cache.rglob("*.lock*")], "a lock was left behind"
    assert not list((cache / "statistics").glob(".activations-*")), "a temporary store was left behind"
    assert not list((cache / "statistics").glob("activations-*")), "the ended multirun keeps no store"


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The same sweep, one cell after the other (Hydra's basic launcher): the reference."""
    work = tmp_path_factory.mktemp("sequential")
    counter = work / "passes"
    _sweep(work / "sweep", work, counter=counter)
    assert len(_passes(counter)) == 1, _passes(counter)
    return _outcomes(work / "sweep")


@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=60"],
], ids=["joblib", "submitit_local"])
def test_parallel_cells_share_one_calibration_pass(tmp_path, sequential, launcher):
    counter = tmp_path / "passes"
    _sweep(tmp_path / "sweep", tmp_path, *launcher, counter=counter)
    passes = _passes(counter)
    assert len(passes) == 1, passes  # the other cell waited for the pass, then read its statistics and store
    _assert_same(_outcomes(tmp_path / "sweep"), sequential)
    _no_leftovers(tmp_path / "sweep")


def test_sweep_killed_while_writing_resumes_cleanly(tmp_path, sequential):
    sweep = tmp_path / "sweep"
    statistics = sweep / ".cache" / "statistics"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", PASS_COUNTER: str(tmp_path / "killed")}
    proc = subprocess.Popen([sys.executable, "-m", "depthbench.cli", "-m", *CELLS, *FAST, "hydra/launcher=joblib",
                             "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    try:
        # the pass's lock is held and its temporary store exists: the writer is mid-write
        while not (list(statistics.glob(".pass-*.lock")) and list(statistics.glob(".activations-*"))):
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline, "the calibration pass never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, like a cancelled job array
        proc.wait()
    assert list(statistics.glob(".pass-*.lock")), "killed while holding the lock"
    assert not list(sweep.rglob("result.json"))

    counter = tmp_path / "passes"
    resumed = _sweep(sweep, tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", counter=counter)
    assert len(_passes(counter)) == 1, _passes(counter)
    logs = resumed.stdout + resumed.stderr + "".join(p.read_text() for p in sweep.rglob("*.log"))
    assert "took over the stale lock" in logs
    _assert_same(_outcomes(sweep), sequential)
    _no_leftovers(sweep)

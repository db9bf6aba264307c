"""Sweeps as users run them: Hydra multirun, resume, leaderboard, plots, offline W&B; every preset."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import CONF
from tests.integration.conftest import needs_offline_packages, run_cli

pytestmark = [pytest.mark.integration, needs_offline_packages]


def _records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("result.json")}


@pytest.mark.slow
def test_two_by_two_sweep_leaderboard_and_resume(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "pruner=uidl,shortgpt", "ratio=0.1,0.2", "scale=fast", "progress=false", f"hydra.sweep.dir={sweep}"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    records = _records(sweep)
    assert len(records) == 4
    assert {(r["method"], r["ratio"]) for r in records.values()} == {
        ("uidl", 0.1), ("uidl", 0.2), ("shortgpt", 0.1), ("shortgpt", 0.2)}
    # offline W&B run files, one run per cell, all in one group named after the sweep
    for cell in sweep.iterdir():
        if cell.is_dir() and not cell.name.startswith("."):
            runs = list((cell / "wandb").glob("offline-run-*"))
            assert len(runs) == 1 and list(runs[0].glob("*.wandb")), cell

    board = run_cli_leaderboard(sweep, tmp_path)
    frame = pd.read_csv(sweep / "leaderboard.csv")
    assert len(frame) == 4 + 1 and frame["config_hash"].is_unique  # 4 cells + the dense base model
    base = frame[frame["method"] == "base (dense)"].iloc[0]
    record = next(iter(records.values()))
    assert base["ppl_pruned"] == pytest.approx(record["metrics"]["base"]["heldout_perplexity"]["perplexity"])
    table, _, pairs = (sweep / "leaderboard.md").read_text().partition("\n## Pairwise comparisons")
    assert table.startswith("Ranked by KL") and table.count("\n| ") == 5 + 1  # header + 5 rows, in rank order
    assert frame.set_index("method").loc["base (dense)", "rank"] == "reference" and frame["rank"].notna().all()
    assert sum(line.startswith("| smollm2") for line in pairs.splitlines()) == 2  # uidl vs shortgpt at each ratio
    assert any(c.startswith("task:") for c in frame.columns) and frame["retention_%"].notna().all()
    for png in ("perplexity_vs_ratio.png", "retention_vs_ratio.png", "task_heatmap.png"):
        data = (sweep / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    csv_before = (sweep / "leaderboard.csv").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in sweep.rglob("result.json")}
    weights = {p: p.stat().st_mtime_ns for p in sweep.rglob("model.safetensors")}

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("nothing redone") == 4
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("result.json")} == mtimes
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("model.safetensors")} == weights
    run_cli_leaderboard(sweep, tmp_path)
    assert (sweep / "leaderboard.csv").read_text() == csv_before
    assert board.returncode == 0


def run_cli_leaderboard(sweep: Path, cwd: Path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "depthbench.experiments.leaderboard", str(sweep)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# The leaderboard preset runs in every CI run (a grid preset, the stored activations of its one pass deleted
# when the multirun ends); the others with `make test-all` (pytest -m slow), to keep CI within its time.
PRESETS = [pytest.param(p.stem, marks=[] if p.stem == "leaderboard" else [pytest.mark.slow])
           for p in sorted((CONF / "experiment").glob("*.yaml"))]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_runs_in_fast_mode(tmp_path, preset):
    sweep = tmp_path / "sweep"
    # lm-eval and saving are covered by the 2 x 2 sweep above; here every preset's cells run in fast mode.
    # no -m: a preset that is a grid sets Hydra's multirun mode itself
    # The grids over every method (leaderboard, ratio_sweep) run here with two cheap methods in their place
    # (the preset's own list is checked against the registry in tests/unit/test_configs.py); a command-line
    # sweep over `pruner` replaces the preset's.
    methods = ["pruner=replaceme_ls,last_layers"] if preset in ("leaderboard", "ratio_sweep") else []
    proc = run_cli(f"experiment={preset}", *methods, "scale=fast", "benchmark=none", "logger=none", "progress=false",
                   "save_model=false",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(sweep)
    assert len(records) > 1, "the preset ran one cell: it did not run as a multirun"
    if methods:
        assert {r["method"] for r in records.values()} == {"replaceme_ls", "last_layers"}
    assert not list(sweep.rglob("model.safetensors")), "save_model=false saved a model"
    for record in records.values():
        assert record["pruning"]["num_layers_after"] < record["pruning"]["num_layers_before"]
    statistics = sweep / ".cache" / "statistics"
    if preset == "leaderboard":
        # the one calibration pass stored every layer's activations for the fits of the other cells;
        # the ended multirun deleted them and kept the statistics
        assert "deleted the sweep's stored calibration activations" in proc.stdout + proc.stderr
        assert list(statistics.glob("*.safetensors"))
    assert not list(statistics.glob("*activations-*"))

"""A third-party pruner, installed as a package with an entry point, runs through the CLI unchanged."""

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO, needs_offline_packages, run_cli

pytestmark = [pytest.mark.integration, needs_offline_packages]


def test_entry_point_plugin_runs_through_the_cli(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(REPO / "examples" / "random_pruner")],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    assert list(site.glob("depthbench_random_pruner-*.dist-info/entry_points.txt"))
    monkeypatch.setenv("PYTHONPATH", str(site))
    run_dir = tmp_path / "run"
    proc = run_cli("pruner.name=random_layers", "~pruner.options", "+pruner.options.seed=1", "scale=fast",
                   "benchmark=none", "logger=none", "progress=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "result.json").read_text())
    import random

    assert record["method"] == "random_layers"
    assert record["pruning"]["removed_layers"] == sorted(random.Random(1).sample(range(30), 8))
    assert (run_dir / "pruned_model" / "config.json").is_file()

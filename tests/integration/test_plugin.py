"""A third-party pruner, installed as a package with an entry point, runs through the CLI unchanged, from a
directory whose own packages are named like depthbench's folders; the plugin imports only depthbench.*."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.integration.conftest import needs_offline_packages, run_cli

pytestmark = [pytest.mark.integration, needs_offline_packages]


def test_entry_point_plugin_runs_through_the_cli(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(REPO / "examples" / "random_pruner")],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    assert list(site.glob("depthbench_random_pruner-*.dist-info/entry_points.txt"))
    monkeypatch.setenv("PYTHONPATH", str(site))
    # The user's own project has packages named like depthbench's folders: nothing may collide.
    for name in ("experiments", "conf", "evaluation", "pruners"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user module was imported')\n")
    run_dir = tmp_path / "run"
    proc = run_cli("pruner=example_random", "pruner.options.seed=1", "scale=fast",
                   "benchmark=none", "logger=none", "progress=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "result.json").read_text())
    import random

    assert record["method"] == "example_random"
    assert record["pruning"]["removed_layers"] == sorted(random.Random(1).sample(range(30), 8))
    assert (run_dir / "pruned_model" / "config.json").is_file()


@pytest.mark.parametrize("example", ["random_pruner/depthbench_random_pruner.py",
                                     "residual_map_pruner/depthbench_residual_map_pruner.py"])
def test_plugin_example_imports_only_depthbench(example):
    """Beside depthbench.*, only torch (a dependency of depthbench, for the fitted map's arithmetic)."""
    from tests.reference import third_party_imports

    third_party = third_party_imports(REPO / "examples" / example)
    assert third_party and all(m in ("depthbench", "torch") or m.startswith("depthbench.") for m in third_party), \
        third_party

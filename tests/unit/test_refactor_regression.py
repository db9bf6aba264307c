"""benchmarks/method_results.py measures ONE code tree.

Its first "before" record (labelled f85af1b) had the older checkout's folder on sys.path over the editable
install: ``depthbench/__init__.py`` (and so the recorded commit) came from the old checkout, but the editable
finder served ``depthbench.pruners`` / ``depthbench.experiments`` from this one, so the "old" cells ran the new
methods with the old YAML defaults (ReplaceMe-cosine with the new ``holdout: 0.1``). These tests rebuild that
layout and an installed copy's layout and check that the script refuses the first and measures the second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import REPO

# setuptools package-dir: these top-level folders are installed as depthbench.<name>
SUBPACKAGES = ("calibration", "conf", "evaluation", "experiments", "modeling", "pruners", "selection", "healing",
               "benchmarks")


def _python(code: str, *path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(str(p) for p in path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=path[0] if path else None)


def test_the_checked_out_code_is_one_tree():
    import depthbench.pruners
    from depthbench.benchmarks import method_results as module

    if not Path(depthbench.pruners.__file__).resolve().is_relative_to(REPO):
        pytest.skip("depthbench is not installed from this checkout")
    assert module.code_root() == REPO


def test_an_old_checkout_on_sys_path_over_the_editable_install_is_refused(tmp_path):
    old = tmp_path / "old_checkout"
    (old / "depthbench").mkdir(parents=True)
    shutil.copy(REPO / "depthbench" / "__init__.py", old / "depthbench" / "__init__.py")
    # the scenario under test: the old checkout's folder first on sys.path, over this checkout's editable install
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import depthbench, depthbench.pruners\n"
            "print('TOP', depthbench.__file__); print('PRUNERS', depthbench.pruners.__file__, flush=True)\n"
            "from depthbench.benchmarks import method_results; method_results.code_root()\n") % str(old)
    proc = _python(code, tmp_path)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("TOP", "PRUNERS")))
    if not Path(lines.get("PRUNERS", "/")).resolve().is_relative_to(REPO):
        pytest.skip("no editable install of this checkout to mix with")
    # the layout of the bad record: top package from the old tree, the methods from this checkout
    assert Path(lines["TOP"]).resolve().is_relative_to(old)
    assert proc.returncode != 0
    assert "two code trees mixed" in proc.stderr, proc.stderr[-2000:]


def test_an_installed_copy_is_measured_with_its_own_config_tree(tmp_path):
    site = tmp_path / "site"
    for item in (REPO / "depthbench").iterdir():
        if item.suffix == ".py":
            (site / "depthbench").mkdir(parents=True, exist_ok=True)
            shutil.copy(item, site / "depthbench" / item.name)
    for name in SUBPACKAGES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, site / "depthbench" / name, ignore=shutil.ignore_patterns("__pycache__"))
    # a marker only the copy has: the composed config must come from the copy's conf/, not the checkout's
    (site / "depthbench" / "conf" / "config.yaml").write_text(
        (REPO / "conf" / "config.yaml").read_text() + "\nseed: 4242\n")
    code = ("from depthbench.benchmarks import method_results\n"
            "print('ROOT', method_results.code_root())\n"
            "print('SEED', method_results.compose('pruner=replaceme_cosine').seed)\n")
    proc = _python(code, site)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("ROOT", "SEED")))
    assert Path(out["ROOT"]).resolve() == site.resolve()
    assert out["SEED"] == "4242"


def test_the_interface_change_records_agree_on_every_method():
    """docs/method_results.json (before the interface change) and docs/method_results_after.json (the same cells on
    the new code, changed defaults pinned back) hold the same layers and perplexity for each method (docs/DESIGN.md)."""
    import json

    before, after = (json.loads((REPO / "docs" / name).read_text())
                     for name in ("method_results.json", "method_results_after.json"))
    assert before["commit"] != after["commit"] and set(before["cells"]) == set(after["cells"])
    assert len(before["cells"]) == 5
    for method, cell in before["cells"].items():
        assert after["cells"][method]["removed_layers"] == cell["removed_layers"], method
        assert after["cells"][method]["perplexity"] == cell["perplexity"], method

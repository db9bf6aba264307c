"""The ``depthbench`` console app as a user runs it: the demo path and bad input."""

import json

import pytest

from tests.integration.conftest import needs_offline_packages, run_cli

pytestmark = [pytest.mark.integration, needs_offline_packages]


def test_cli_prunes_evaluates_saves_and_prints_table(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("calibration.n_samples=16", "evaluation.perplexity.max_windows=4", "benchmark.limit=2",
                   "efficiency.repeats=1", "progress=false",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out perplexity" in proc.stdout and "removed layers" in proc.stdout
    assert "benchmark average" in proc.stdout and "decode tokens/s" in proc.stdout
    record = json.loads((run_dir / "result.json").read_text())
    assert record["pruning"]["num_layers_after"] == 22
    base = record["metrics"]["base"]["heldout_perplexity"]["perplexity"]
    pruned = record["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]
    assert 5 < base < pruned
    assert set(record["metrics"]["pruned"]["tasks"]) == set(record["metrics"]["base"]["tasks"])
    assert len(record["metrics"]["base"]["tasks"]) == 6
    assert record["metrics"]["speedup"]["prefill"] > 0 and "average_percent" in record["metrics"]["retention"]
    assert record["provenance"]["packages"]["lm_eval"]
    assert (run_dir / "pruned_model" / "pruning.json").is_file()
    assert (run_dir / "pruned_model" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing written outside the run directory"


@pytest.fixture
def short_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "short.txt"
    path.write_text("Only a handful of words here.\n")
    return path


BAD_INPUT = [
    # (overrides, expected fragment of the one-line error)
    (["pruner=nope"], "pruner/nope"),
    (["model=nope"], "model/nope"),
    (["calibration=nope"], "calibration/nope"),
    (["ratio=0"], "ratio=0 is out of range; allowed: 0 < ratio < 1"),
    (["ratio=1"], "ratio=1 is out of range"),
    (["ratio=-0.1"], "ratio=-0.1 is out of range"),
    (["ratio=1.5"], "ratio=1.5 is out of range"),
    (["ratio=abc"], "ratio='abc' is not a number"),
    (["ratio=0.01"], "removes no layer of 30"),
    (["ratio=0.999"], "removes all 30 layers"),
    (["+pruner.options.bogus=1"], "unknown option(s) bogus for pruner 'uidl'"),
    (["model.name_or_path=/nonexistent/model"], "no such directory"),
    (["model.dtype=int8"], "model.dtype='int8' is not supported"),
    (["calibration.n_samples=0"], "calibration.n_samples=0 must be a positive integer"),
    (["calibration=local", "calibration.path=SHORT"], "calibration data too short"),
    (["calibration=local", "calibration.path=/nonexistent.txt"], "no such file"),
    (["hydra.run.dir=SHORT/run"], "is not a directory"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_one_clear_line_and_nothing_on_disk(tmp_path, short_text, overrides, expected):
    workdir = tmp_path / "work"
    workdir.mkdir()
    args = [o.replace("SHORT", str(short_text)) for o in overrides]
    proc = run_cli(*args, "progress=false", cwd=workdir)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert list(workdir.iterdir()) == [], f"left on disk: {list(workdir.rglob('*'))}"

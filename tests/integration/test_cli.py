"""The ``depthbench`` console app as a user runs it: the demo path and bad input."""

import json

import pytest

from tests.helpers import compose
from tests.integration.conftest import needs_offline_packages, run_cli
from tests.offline_packages import bigbench_installed

pytestmark = [pytest.mark.integration, needs_offline_packages]


def test_cli_prunes_evaluates_saves_and_prints_table(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("calibration.n_samples=8", "evaluation.perplexity.max_windows=4", "benchmark.limit=2",
                   "efficiency.repeats=1", "efficiency.max_rounds=2", "efficiency.budget_s=5", "progress=false",
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
    default_suite = {t["name"] for t in compose().benchmark.tasks}
    assert set(record["metrics"]["base"]["tasks"]) == default_suite
    assert record["metrics"]["speedup"]["prefill"] > 0 and "average_percent" in record["metrics"]["retention"]
    assert record["provenance"]["packages"]["lm_eval"]
    assert (run_dir / "pruned_model" / "pruning.json").is_file()
    assert (run_dir / "pruned_model" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing written outside the run directory"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "short.txt").write_text("Only a handful of words here.\n")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e, encore.".encode("latin-1"))
    return root


BAD_INPUT = [
    # (overrides, expected fragment of the one-line error)
    (["pruner=nope"], "pruner=nope: no such config; allowed: blockpruner, finercut,"),
    (["model=nope"], "model=nope: no such config; allowed:"),
    (["calibration=nope"], "calibration=nope: no such config; allowed:"),
    # refused by Hydra while composing (typed settings): the same one line, Hydra's own report not shown
    (["calibration.n_samples=abc"], "calibration.n_samples: Value 'abc' of type 'str' could not be converted to "
                                    "Integer; allowed: a value of type int"),
    (["evaluation.bogus=1"], "evaluation.bogus: evaluation has no setting 'bogus'; allowed keys of evaluation: "
                             "perplexity, fidelity"),
    (["ratio"], "Error parsing override 'ratio'; overrides are KEY=VALUE"),
    (["+evaluation.bogus=1"], "evaluation.bogus: evaluation has no setting 'bogus'"),  # an append: the run's check
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
    (["calibration=local", "calibration.path=DATA/short.txt"], "calibration data too short"),
    (["calibration=local", "calibration.path=DATA/empty.txt"], "has no documents"),
    (["calibration=local", "calibration.path=DATA/latin1.txt"], "is not UTF-8 text"),
    (["calibration=local", "calibration.path=/nonexistent.txt"], "no such file"),
    (["hydra.run.dir=DATA/short.txt/run"], "is not a directory"),
    (["pruner=replaceme_ls", "pruner.options.num_blocks=3"], "8 layers to remove do not split into num_blocks=3"),
    (["pruner=uidl", "pruner.options.min_start=5"], "min_start=5"),
    # alpha 0 on fewer tokens (2 x 64) than hidden dimensions (576): rank-deficient least squares
    (["pruner=replaceme_ls", "calibration.n_samples=2", "calibration.seq_len=64", "evaluate=false"],
     "is singular"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_one_clear_line_and_nothing_on_disk(tmp_path, files, overrides, expected):
    workdir = tmp_path / "work"
    workdir.mkdir()
    args = [o.replace("DATA", str(files)) for o in overrides]
    proc = run_cli(*args, "progress=false", cwd=workdir)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert proc.returncode == 2 and proc.stderr.count("depthbench: error:") == 1, proc.stderr[-2000:]
    assert list(workdir.iterdir()) == [], f"left on disk: {list(workdir.rglob('*'))}"


@pytest.mark.skipif(bigbench_installed(), reason="BIG-bench 1.0.0 is installed here: nothing is missing")
@pytest.mark.parametrize("override,needs", [("calibration=bigbench_wikipedia", "the text source bigbench_wikipedia"),
                                            ("benchmark=bigbench", "benchmark=bigbench (BIG-bench tasks)")])
def test_bigbench_without_the_package_is_one_line_status_2_nothing_on_disk(tmp_path, override, needs):
    proc = run_cli(override, "progress=false", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"depthbench: error: {needs} needs the package `bigbench`")
    assert "docs/USAGE.md" in lines[0] and "needs no BIG-bench" in lines[0]
    assert list(tmp_path.iterdir()) == []

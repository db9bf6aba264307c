"""Faults and determinism: a killed sweep resumes cleanly; the same config and seed give the same
result; model directories that are broken or not causal LMs fail with one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from depthbench.experiments.pipeline import run
from tests.helpers import compose
from tests.integration.conftest import needs_offline_packages, run_cli

pytestmark = [pytest.mark.integration, needs_offline_packages]


@pytest.mark.slow
def test_same_config_and_seed_give_identical_results(tmp_path):
    overrides = ["pruner=shortgpt", "scale=fast", "logger=none", "cache.statistics=false", "cache.base_results=false",
                 "progress=false", "seed=3"]
    a = run(compose(*overrides), tmp_path / "a")
    b = run(compose(*overrides), tmp_path / "b")
    assert a["seed"] == b["seed"] == 3
    assert a["pruning"]["removed_layers"] == b["pruning"]["removed_layers"]
    assert a["pruning"]["scores"] == b["pruning"]["scores"]
    for side in ("base", "pruned"):
        assert a["metrics"][side]["heldout_perplexity"] == b["metrics"][side]["heldout_perplexity"]
        assert a["metrics"][side]["tasks"] == b["metrics"][side]["tasks"]
    assert a["provenance"]["packages"]["torch"] and a["provenance"]["packages"]["transformers"]
    assert a["config_hash"] == b["config_hash"]


@pytest.mark.slow
def test_sweep_killed_mid_cell_resumes_without_duplicates(tmp_path):
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "depthbench.cli", "-m", "pruner=uidl,shortgpt", "ratio=0.1,0.2", "scale=fast",
            "logger=none", "progress=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(sweep.rglob("result.json"))) < 1:
        time.sleep(0.2)
    time.sleep(1.0)  # now inside the next cell
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = len(list(sweep.rglob("result.json")))
    assert 1 <= finished_before < 4, "the kill must land mid-sweep"

    again = run_cli(*args[3:], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep.rglob("result.json")]  # every file parses
    assert len(records) == 4
    assert again.stdout.count("nothing redone") == finished_before
    assert not list(sweep.rglob(".*.tmp")), "no half-written leftovers"
    lb = subprocess.run([sys.executable, "-m", "depthbench.experiments.leaderboard", str(sweep)], cwd=tmp_path,
                        capture_output=True, text=True)
    assert lb.returncode == 0, lb.stderr
    frame = pd.read_csv(sweep / "leaderboard.csv")
    assert len(frame) == 4 + 1 and not frame.duplicated(["method", "ratio"]).any()


@pytest.fixture
def broken_model_dirs(tmp_path):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    good = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(good)
    missing = tmp_path / "missing_weights"
    missing.mkdir()
    (missing / "config.json").write_text((good / "config.json").read_text())
    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    (corrupted / "config.json").write_text((good / "config.json").read_text())
    (corrupted / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:200])
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    return {"missing": missing, "corrupted": corrupted, "bert": bert}


@pytest.mark.parametrize("kind,expected", [("missing", "cannot load model"), ("corrupted", "cannot load model"),
                                           ("bert", "unsupported model family 'bert'; supported: ")])
def test_broken_model_directories(tmp_path, broken_model_dirs, kind, expected):
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli(f"model.name_or_path={broken_model_dirs[kind]}", "progress=false", "logger=none", cwd=work)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert list(work.iterdir()) == []


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_cli("ratio=1.5", "debug=true", "progress=false", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ratio=1.5 is out of range" in proc.stderr

"""`experiment=ratio_sweep` as shipped: every built-in method and baseline at its three ratios, end to end, on a
tiny randomly initialised stand-in of the embedded default (SmolLM2's architecture family and tokenizer, 16
layers of width 32) loaded the way a Hub model is (`model=hf model.name_or_path=DIR`). On the embedded model
itself, SLEB, Shortened-PPL and BlockPruner re-score the model once per candidate unit: hours on a 2-core CPU,
so the real-model run is `depthbench experiment=ratio_sweep scale=fast` by hand (README)."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import build_tiny_model, compose, tiny_llama_config
from tests.integration.conftest import needs_offline_packages, run_cli

# 42 cells in 167 s on the 2-core CPU (alone; about 11 minutes when another job shares the cores): in CI
pytestmark = [pytest.mark.integration, needs_offline_packages]

LAYERS = 16


@pytest.fixture
def tiny_smollm2_dir(tmp_path):
    """A save_pretrained directory with SmolLM2's tokenizer and a tiny Llama body: 16 layers (Shortened LLaMA
    protects the first 4 and the last 2, so 8 layers leave too few to remove 37.5%), hidden 32 (a power of two,
    as LinearPatch's Hadamard rotation needs)."""
    from depthbench.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(compose().model)
    config = tiny_llama_config(num_layers=LAYERS, hidden=32, vocab=len(tokenizer), max_position_embeddings=256,
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path / "tiny-smollm2"
    build_tiny_model(config, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_ratio_sweep_runs_every_method_at_three_ratios(tmp_path, tiny_smollm2_dir):
    from depthbench.pruners import pruner_registry

    sweep = tmp_path / "sweep"
    builtin = {n for n in pruner_registry.names() if pruner_registry.get(n).__module__.startswith("depthbench.")}
    common = ("experiment=ratio_sweep", "model=hf", f"model.name_or_path={tiny_smollm2_dir}", "scale=fast",
              "calibration.seq_len=32", "calibration.batch_size=2", "benchmark=none", "logger=none", "progress=false",
              "save_model=false", "efficiency.enabled=false", f"hydra.sweep.dir={sweep}")
    # scale=fast, and 2 x 32 calibration tokens: the tiny model's cost is its 49,152-token softmax, and SLEB,
    # BlockPruner and FinerCut score every candidate unit at every step (minutes at scale=fast's 8 x 128 tokens);
    # MKA's k-NN entropy needs more than 50 sequences: it runs as a second grid into the same sweep
    proc = run_cli(*common, "pruner=" + ",".join(sorted(builtin - {"mka"})), "calibration.n_samples=2",
                   cwd=tmp_path, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(*common, "pruner=mka", "calibration.n_samples=56", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep.rglob("result.json")]
    ratios = (0.125, 0.25, 0.375)
    assert sorted((r["method"], r["ratio"]) for r in records) == sorted((m, x) for m in builtin for x in ratios)
    for record in records:
        pruning = record["pruning"]
        removed = pruning["layer_equivalents_removed"]
        target = record["ratio"] * LAYERS
        if record["method"] == "laco":  # merges: at most R layers' worth (stop=threshold may merge fewer)
            assert 0 < removed <= target + 1e-9, record["method"]
        elif record["method"] == "finercut":  # the reference's budget: a count of 2R sub-blocks, whatever they hold
            assert pruning["removed_attention_modules"] + pruning["removed_mlp_modules"] == 2 * round(target)
        elif record["method"] in ("llm_drop", "blockpruner"):  # sub-blocks: about R layers' worth
            assert 0 < removed <= target + 1, (record["method"], removed)
        else:  # whole layers (LLM-Streamline removes n + 1 and adds one trained layer back: n net)
            assert LAYERS - pruning["num_layers_after"] == round(target), (record["method"], pruning)
        pruned = record["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]
        assert math.isfinite(pruned) and pruned > 0, record["method"]
    frame = _leaderboard(sweep, tmp_path)
    assert set(frame["method"]) == builtin | {"base (dense)"}


def _leaderboard(sweep: Path, cwd: Path) -> pd.DataFrame:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "depthbench.experiments.leaderboard", str(sweep)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pd.read_csv(sweep / "leaderboard.csv")

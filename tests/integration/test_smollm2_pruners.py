"""Every method on the real SmolLM2 at 25%: runs, saves a model that reloads with identical logits,
and ReplaceMe-LS beats UIDL on held-out perplexity with the same calibration data (published order)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.experiments.pipeline import run
from tests.helpers import PROBE_IDS, compose
from tests.integration.conftest import needs_offline_packages

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_offline_packages]

METHODS = ["uidl", "replaceme_ls", "replaceme_cosine", "shortgpt", "llm_streamline"]
PROBE = torch.tensor(PROBE_IDS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    records, in_memory = {}, {}

    def probe(method):
        def keep_logits(model, tokenizer):
            with torch.no_grad():
                in_memory[method] = model(input_ids=PROBE).logits
        return keep_logits

    for method in METHODS:
        cfg = compose(f"pruner={method}", "ratio=0.25", "calibration.n_samples=32",
                      "evaluation.perplexity.max_windows=8", "benchmark=none", "efficiency.enabled=false",
                      "logger=none", "progress=false", f"cache.dir={root / 'cache'}")
        records[method] = run(cfg, root / method, after_prune=probe(method))
    yield root, records, in_memory
    shutil.rmtree(root, ignore_errors=True)  # five saved models: ~1 GB


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_and_saved_model_reloads(runs, method):
    root, records, in_memory = runs
    record = records[method]
    assert json.loads((root / method / "result.json").read_text())["config_hash"] == record["config_hash"]
    p = record["pruning"]
    assert p["num_layers_before"] == 30 and len(p["removed_layers"]) == 8
    assert p["num_layers_after"] == 22
    saved = root / method / "pruned_model"
    meta = json.loads((saved / "pruning.json").read_text())
    assert meta["removed_layers"] == p["removed_layers"] and meta["method"] == method
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert model.config.num_hidden_layers == 22
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, in_memory[method], rtol=0, atol=0)
    ppl = record["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]
    assert ppl == ppl and ppl > record["metrics"]["base"]["heldout_perplexity"]["perplexity"]


def test_replaceme_ls_beats_uidl_on_the_same_data(runs):
    _, records, _ = runs
    ls, uidl = records["replaceme_ls"], records["uidl"]
    assert ls["pruning"]["removed_layers"] == uidl["pruning"]["removed_layers"], "same block, only T differs"
    assert ls["calibration"] == uidl["calibration"]
    ppl = {m: records[m]["metrics"]["pruned"]["heldout_perplexity"]["perplexity"] for m in ("replaceme_ls", "uidl")}
    assert ppl["replaceme_ls"] < 0.95 * ppl["uidl"], ppl


def test_streamline_reports_the_parameters_it_adds(runs):
    _, records, _ = runs
    replacement = records["llm_streamline"]["pruning"]["replacement"]
    per_layer = records["llm_streamline"]["pruning"]["parameters_before"]["per_layer"]
    assert replacement["new_parameters"] == per_layer

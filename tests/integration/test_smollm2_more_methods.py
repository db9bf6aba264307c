"""The second wave of methods on the real SmolLM2 with a CI-sized budget (2 x 32 calibration tokens, one layer's
worth removed: SLEB, Shortened-PPL and BlockPruner re-score the model once per candidate unit): each runs through
the pipeline, records what it removed, and saves a model that reloads from disk with the in-memory pruned model's
logits (plain ``from_pretrained`` unless the directory says it needs depthbench's loader)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.modeling.saving import CUSTOM_MODULES_FILE, load_pruned
from tests.helpers import PROBE_IDS
from tests.integration.conftest import needs_offline_packages, run_small_cells

pytestmark = [pytest.mark.integration, needs_offline_packages]

#: cell name -> overrides
CELLS = {
    "sleb": ["pruner=sleb"],
    "shortened_ppl": ["pruner=shortened_ppl"],
    "shortened_taylor": ["pruner=shortened_taylor"],
    "llm_drop": ["pruner=llm_drop"],
    "blockpruner": ["pruner=blockpruner", "pruner.options.budget=count", "pruner.options.n_modules=2"],
    "laco": ["pruner=laco", "pruner.options.C=2", "pruner.options.sentences=2", "pruner.options.bisection_steps=3"],
    "linearpatch": ["pruner=linearpatch"],
    "last_layers": ["pruner=last_layers"],
    "random_layers": ["pruner=random_layers"],
    "shortgpt+magnitude": ["pruner=shortgpt", "pruner.compensate=magnitude"],
}
PROBE = torch.tensor(PROBE_IDS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("more_methods")
    records, in_memory = run_small_cells(root, CELLS)
    yield root, records, in_memory
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("cell", list(CELLS))
def test_method_runs_records_and_saved_model_reloads(runs, cell):
    root, records, in_memory = runs
    record = records[cell]
    p = record["pruning"]
    assert p["num_layers_before"] == 30
    removed_body = p["parameters_before"]["without_embeddings"] - p["parameters_after"]["without_embeddings"]
    assert removed_body > 0
    assert p["layer_equivalents_removed"] == pytest.approx(removed_body / p["parameters_before"]["per_layer"])
    saved = root / cell / "pruned_model"
    meta = json.loads((saved / "pruning.json").read_text())
    assert meta["removed_layers"] == p["removed_layers"]
    assert meta.get("removed_sub_blocks", []) == p.get("removed_sub_blocks", [])
    if (saved / CUSTOM_MODULES_FILE).is_file():
        model = load_pruned(saved)
    else:
        model = AutoModelForCausalLM.from_pretrained(saved)
    model.eval()
    assert model.config.num_hidden_layers == p["num_layers_after"]
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, in_memory[cell], rtol=1e-5, atol=1e-5)
    base = record["metrics"]["base"]["heldout_perplexity"]["perplexity"]
    pruned = record["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]
    assert pruned == pruned and pruned > 0 and base > 0

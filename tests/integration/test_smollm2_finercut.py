"""FinerCut on the real SmolLM2 through the pipeline at scale=fast, with a CI-sized budget (2 x 32 calibration
tokens; ratio 0.04 = one layer, so K = 2R = 2 sub-blocks, or one layer's parameters): the record says what was
removed and how it was scored, and the saved model reloads from disk with the sub-blocks gone (plain
``from_pretrained``: their output projections are zero; depthbench's loader: the parameter-free stand-ins back)
and the in-memory pruned model's logits."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.saving import load_pruned
from depthbench.modeling.units import as_unit
from tests.helpers import PROBE_IDS
from tests.integration.conftest import needs_offline_packages, run_small_cells

pytestmark = [pytest.mark.integration, needs_offline_packages]

CELLS = {
    "greedy_js_ref": ["pruner=finercut"],
    "one_shot_kl_params": ["pruner=finercut", "pruner.options.divergence=kl", "pruner.options.mode=one_shot",
                           "pruner.options.budget=params", "pruner.options.exclude_front=0"],
}
PROBE = torch.tensor(PROBE_IDS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finercut")
    records, in_memory = run_small_cells(root, CELLS)
    yield root, records, in_memory
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("cell", list(CELLS))
def test_finercut_records_its_choice_and_the_saved_model_reloads_without_the_sub_blocks(runs, cell):
    root, records, in_memory = runs
    p = records[cell]["pruning"]
    scores = p["scores"]
    assert p["num_layers_before"] == 30 and scores["scored_samples"] == 2  # scale=fast: all calibration sequences
    order = scores["removed_in_order"]
    if cell == "greedy_js_ref":
        assert scores["modules"] == 2 == len(order) and scores["evaluations"] == 34 + 33  # layers 0-12 withheld
        assert all(as_unit(u).layer > 12 for u in order)
        assert scores["D"] > 0 and scores["D_over_V"] == pytest.approx(scores["D"] / 49152)
    else:
        assert scores["removed_parameters"] >= p["parameters_before"]["per_layer"] and scores["D"] is None
    removed = sorted(p["removed_sub_blocks"] + [f"{k}.{part}" for k in p["removed_layers"] for part in ("attn", "mlp")])
    assert removed == sorted(order)

    saved = root / cell / "pruned_model"
    meta = json.loads((saved / "pruning.json").read_text())
    assert meta["removed_layers"] == p["removed_layers"] and meta["removed_sub_blocks"] == p["removed_sub_blocks"]
    plain = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert plain.config.num_hidden_layers == p["num_layers_after"] == 30 - len(p["removed_layers"])
    assert len(meta.get("zeroed_sub_blocks", [])) == len(p["removed_sub_blocks"])
    for name in meta.get("zeroed_sub_blocks", []):  # the plain checkpoint: zero output projections
        unit = as_unit(name)
        layer = plain.model.layers[unit.layer]
        proj = layer.self_attn.o_proj if unit.part == "attention" else layer.mlp.down_proj
        assert all(bool((w == 0).all()) for w in proj.parameters())
    loaded = load_pruned(saved)
    assert len(ModelSurgery(adapter_for(loaded)).removed_sub_blocks()) == len(p["removed_sub_blocks"])
    with torch.no_grad():
        for model in (plain, loaded):
            torch.testing.assert_close(model(input_ids=PROBE).logits, in_memory[cell], rtol=1e-5, atol=1e-5)

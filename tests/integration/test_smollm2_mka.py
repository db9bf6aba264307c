"""MKA on the real SmolLM2 at scale=fast (56 calibration sequences of 32 tokens: the entropy estimate needs more than
50 points; 10% = 3 merges): the record carries the NPIB matrix and the merges, the saved model reloads with the
in-memory pruned model's logits, and equals the dense model rebuilt from the recorded coefficients."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.experiments.pipeline import run
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.loading import load_model
from tests.helpers import PROBE_IDS, compose
from tests.integration.conftest import needs_offline_packages

pytestmark = [pytest.mark.integration, needs_offline_packages]

PROBE = torch.tensor(PROBE_IDS)
LAYERS = 30


def test_mka_runs_records_and_saved_model_reloads(tmp_path):
    in_memory = {}

    def keep_logits(model, tokenizer):
        with torch.no_grad():
            in_memory["logits"] = model(input_ids=PROBE).logits

    cfg = compose("pruner=mka", "ratio=0.1", "scale=fast", "calibration.n_samples=56", "calibration.seq_len=32",
                  "calibration.batch_size=8", "benchmark=none", "efficiency.enabled=false",
                  "evaluation.fidelity.enabled=false", "logger=none", "progress=false",
                  f"cache.dir={tmp_path / 'cache'}")
    record = run(cfg, tmp_path / "run", after_prune=keep_logits)
    p = record["pruning"]
    scores = p["scores"]
    merges = scores["merges"]
    # pair=last: 29 into 28, that into 27, that into 26
    assert [(m["into"], m["merged"]) for m in merges] == [(28, 29), (27, 28), (26, 27)]
    assert p["removed_layers"] == [27, 28, 29] and p["num_layers_after"] == LAYERS - 3
    S = np.array(scores["S"], dtype=float)
    assert S.shape == (LAYERS, LAYERS) and scores["n_points"] == 56
    assert scores["nan_count"] == int(np.isnan(S[np.triu_indices(LAYERS)]).sum())
    s = np.nanmean(S, axis=1)
    for m in merges:
        a, b = m["into"], m["merged"]
        assert m["alpha"] == pytest.approx(1 / (1 + np.exp(-s[a] / (s[a] + s[b]))), rel=1e-9)

    saved = tmp_path / "run" / "pruned_model"
    meta = json.loads((saved / "pruning.json").read_text())
    assert meta["removed_layers"] == p["removed_layers"]
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert model.config.num_hidden_layers == LAYERS - 3
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    torch.testing.assert_close(logits, in_memory["logits"], rtol=1e-5, atol=1e-5)

    dense = load_model(cfg.model).model.eval()  # rebuilt from the recorded coefficients, written out here
    layers = dense.model.layers
    with torch.no_grad():
        for m in merges:
            into, merged = layers[m["into"]], layers[m["merged"]]
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                w = into.get_submodule(name).weight
                w.copy_((m["alpha"] * w.double() + (1 - m["alpha"]) * merged.get_submodule(name).weight.double())
                        .to(w.dtype))
    ModelSurgery(adapter_for(dense)).remove_layers([m["merged"] for m in merges])
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=PROBE).logits.to(logits.dtype), logits, rtol=1e-5, atol=1e-5)
    pruned = record["metrics"]["pruned"]["heldout_perplexity"]["perplexity"]
    assert np.isfinite(pruned) and pruned > 0

"""UIDL on the real SmolLM2 at 25%: the block equals a direct computation; the saved model reloads."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.calibration.batches import load_calibration
from depthbench.experiments.pipeline import run
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.loading import load_model
from tests.helpers import compose
from tests.integration.conftest import needs_offline_packages
from tests.reference import last_token_angular_distance_np, residual_states_np

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_offline_packages]


def test_uidl_25_percent_matches_direct_computation_and_reloads(tmp_path):
    cfg = compose("pruner=uidl", "ratio=0.25", "calibration.n_samples=32", "evaluate=false", "progress=false")
    record = run(cfg, tmp_path)

    loaded = load_model(cfg.model)
    batches = load_calibration(cfg.calibration, loaded.tokenizer).batches
    hs, last = residual_states_np(loaded.model, batches)
    L, n = 30, 8
    d = {s: last_token_angular_distance_np(hs, last, s, n) for s in range(1, L - n + 1)}
    best = min(d, key=lambda s: (d[s], s))
    assert record["pruning"]["removed_layers"] == list(range(best, best + n))
    np.testing.assert_allclose(record["pruning"]["scores"]["values"], list(d.values()), rtol=1e-9)

    saved = tmp_path / "pruned_model"
    meta = json.loads((saved / "pruning.json").read_text())
    assert meta["removed_layers"] == record["pruning"]["removed_layers"]
    assert meta["seed"] == 0 and meta["provenance"]["packages"]["torch"]
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert reloaded.config.num_hidden_layers == 22
    ModelSurgery(adapter_for(loaded.model)).remove_layers(meta["removed_layers"])
    batch = batches[0]
    with torch.no_grad():
        a = reloaded(**batch, use_cache=False).logits
        b = loaded.model(**batch, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    out = reloaded.generate(batch["input_ids"][:1, :16], max_new_tokens=5, do_sample=False,
                            pad_token_id=loaded.tokenizer.pad_token_id)
    assert out.shape[1] == 21

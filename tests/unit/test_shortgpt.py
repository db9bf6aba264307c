"""ShortGPT: Block Influence against a brute-force float64 computation, and the removal it drives."""

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_model, random_batches, tiny_llama_config
from tests.reference import block_influence_np, residual_states_np


@pytest.mark.parametrize("n_remove", [1, 3])
def test_block_influence_and_removed_layers_equal_brute_force(n_remove):
    L = 8
    model = build_tiny_model(tiny_llama_config(num_layers=L), seed=7).to(torch.float64)
    batches = random_batches(n_batches=3, seed=7)
    hs, _ = residual_states_np(model, batches)
    width = max(b["input_ids"].shape[1] for b in batches)
    masks = np.concatenate([np.pad(b["attention_mask"].numpy(), ((0, 0), (0, width - b["input_ids"].shape[1])))
                            for b in batches]).astype(bool)
    bi = block_influence_np(hs, masks)
    expected = sorted(sorted(range(L), key=lambda k: (bi[k], k))[:n_remove])
    result = build_pruner("shortgpt").prune(adapter_for(model), CalibrationData(batches, 16), n_remove,
                                            progress=False)
    np.testing.assert_allclose(result.selection.scores["values"], bi, rtol=1e-10, atol=1e-13)
    assert result.removed_layers == expected
    assert model.config.num_hidden_layers == L - n_remove and result.replacement is None
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def test_removed_layers_need_not_be_contiguous():
    from depthbench.pruners.methods.shortgpt import ShortGPTPruner
    from depthbench.calibration.statistics import PairwiseSimilarity

    stat = PairwiseSimilarity(6, gap=1, tokens="all")
    stat.sum_cos = torch.tensor([0.1, 0.9, 0.2, 0.95, 0.3, 0.5], dtype=torch.float64)
    stat.count = 1
    selection = ShortGPTPruner().select([stat], None, 2, None)
    assert selection.removed_layers == [1, 3]


def test_last_layer_final_norm_equals_the_official_codes_hidden_states():
    """``last_layer: final_norm`` scores the last layer as the official code does, on HF's last hidden state
    (taken after the final norm), computed here from ``output_hidden_states`` in float64; ``pre_norm`` (the
    paper's definition, the default) differs only in that layer when the final norm's gains are not 1."""
    L = 6
    model = build_tiny_model(tiny_llama_config(num_layers=L), seed=3).to(torch.float64)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, model.config.hidden_size, dtype=torch.float64))
    batches = random_batches(n_batches=2, seed=3)
    sums, count = np.zeros(L), 0
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states  # hs[-1] is after the final norm
            mask = b["attention_mask"].bool()
            for k in range(L):
                x, y = hs[k][mask].numpy(), hs[k + 1][mask].numpy()
                sums[k] += ((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))).sum()
            count += int(mask.sum())
    official = 1 - sums / count
    scores = {}
    for last_layer in ("final_norm", "pre_norm"):
        pruner = build_pruner("shortgpt", {"last_layer": last_layer})
        copy_model = build_tiny_model(tiny_llama_config(num_layers=L), seed=3).to(torch.float64)
        copy_model.load_state_dict(model.state_dict())
        result = pruner.prune(adapter_for(copy_model), CalibrationData(batches, 16), 2, progress=False)
        scores[last_layer] = np.array(result.selection.scores["values"])
    np.testing.assert_allclose(scores["final_norm"], official, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scores["pre_norm"][:-1], official[:-1], rtol=1e-10, atol=1e-12)
    assert abs(scores["pre_norm"][-1] - official[-1]) > 1e-3


def test_an_unknown_last_layer_rule_names_the_value():
    from depthbench.errors import ConfigError

    with pytest.raises(ConfigError, match="last_layer='post'; allowed: pre_norm, final_norm"):
        build_pruner("shortgpt", {"last_layer": "post"}).validate_options()

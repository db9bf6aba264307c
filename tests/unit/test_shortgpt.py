"""ShortGPT: Block Influence against a brute-force float64 computation, and the removal it drives."""

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from tests.conftest import build_tiny_model, random_batches, tiny_llama_config
from tests.reference import residual_states_np


def block_influence_np(hs, masks):
    """BI_k = 1 - mean over real tokens of cos(h_k, h_{k+1}); h_L taken before the final norm."""
    out = []
    for k in range(len(hs) - 1):
        a, b = hs[k][masks], hs[k + 1][masks]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        out.append(float(1 - np.mean(cos)))
    return out


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
    from depthbench.pruners.shortgpt import ShortGPTPruner
    from depthbench.calibration.statistics import PairwiseSimilarity

    stat = PairwiseSimilarity(6, gap=1, tokens="all")
    stat.sum_cos = torch.tensor([0.1, 0.9, 0.2, 0.95, 0.3, 0.5], dtype=torch.float64)
    stat.count = 1
    selection = ShortGPTPruner().select([stat], None, 2, None)
    assert selection.removed_layers == [1, 3]

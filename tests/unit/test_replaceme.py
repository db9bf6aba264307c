"""ReplaceMe (LS and cosine): selection, transform fit and fold, against independent float64 references."""

import copy

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.service import CalibrationService
from depthbench.calibration.statistics import collect
from depthbench.errors import ConfigError, NumericalError
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from tests.helpers import build_tiny_model, random_batches, tiny_llama_config
from tests.reference import last_token_angular_distance_np, residual_states_np


@torch.no_grad()
def token_rows(model, batches, i: int, e: int):
    """(M_i, Y_i, h_e) at every real token, float64, without the code's MLP hooks: h from
    ``output_hidden_states`` (e < L, so before the final norm), the attention sub-block's output from
    a hook on ``self_attn``; ``Y_i = h_i + attn_i`` and ``M_i = h_{i+1} - Y_i``."""
    assert e < model.config.num_hidden_layers
    captured = {}
    handle = model.model.layers[i].self_attn.register_forward_hook(
        lambda mod, args, out: captured.__setitem__("attn", out[0]))
    ms, ys, hs = [], [], []
    try:
        for b in batches:
            states = model(**b, output_hidden_states=True, use_cache=False).hidden_states
            real = b["attention_mask"].bool()
            y = states[i] + captured["attn"]
            ms.append((states[i + 1] - y)[real].numpy())
            ys.append(y[real].numpy())
            hs.append(states[e][real].numpy())
    finally:
        handle.remove()
    return np.concatenate(ms), np.concatenate(ys), np.concatenate(hs)


def stages(name, options, model, batches, n_remove):
    """Run the pruner's stages one by one: (pruner, adapter, selection, calibration service)."""
    pruner = build_pruner(name, options)
    adapter = adapter_for(model)
    service = CalibrationService(adapter, CalibrationData(batches, 16), progress=False)
    stats = collect(adapter, batches, pruner.statistics(adapter, n_remove), progress=False)
    selection = pruner.select(stats, adapter, n_remove, service)
    return pruner, adapter, selection, service


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_ls_transform_equals_numpy_lstsq(tiny_llama64, ridge):
    batches = random_batches(n_batches=3, batch_size=4, seq_len=16)
    n = 2
    s = stages("replaceme_ls", {}, tiny_llama64, batches, n)[2].blocks[0].start
    m, y, h = token_rows(tiny_llama64, batches, s - 1, s + n)
    d = m.shape[1]
    alpha = ridge * float((m * m).sum()) / d  # a ridge on the scale of A's diagonal
    pruner, adapter, selection, calibration = stages("replaceme_ls", {"alpha": alpha}, tiny_llama64, batches, n)
    ((block, T, info),) = pruner.fit(adapter, selection, calibration)
    assert (block.start, block.end) == (s, s + n)
    target = h - y
    design = np.vstack([m, np.sqrt(alpha) * np.eye(d)])  # ridge as an augmented least-squares system
    rhs = np.vstack([target, np.zeros((d, d))])
    expected = np.linalg.lstsq(design, rhs, rcond=None)[0]
    np.testing.assert_allclose(T.numpy(), expected, rtol=1e-9, atol=1e-11 * np.abs(expected).max())
    residual = np.linalg.norm(m @ expected - target) / np.linalg.norm(target)
    np.testing.assert_allclose(info["relative_residual"], residual, rtol=1e-6)
    np.testing.assert_allclose(info["relative_residual_without_transform"],
                               np.linalg.norm(m - target) / np.linalg.norm(target), rtol=1e-6)
    assert info["tokens"] == m.shape[0]


def test_ls_diagonal_transform_equals_elementwise_formula(tiny_llama64):
    batches = random_batches(n_batches=2, batch_size=4, seq_len=16, seed=3)
    alpha = 1e-4
    pruner, adapter, selection, calibration = stages("replaceme_ls", {"diag": True, "alpha": alpha},
                                                     tiny_llama64, batches, 2)
    s, e = selection.blocks[0].start, selection.blocks[0].end
    ((_, T, _),) = pruner.fit(adapter, selection, calibration)
    m, y, h = token_rows(tiny_llama64, batches, s - 1, e)
    expected = (m * (h - y)).sum(0) / ((m * m).sum(0) + alpha)
    np.testing.assert_allclose(np.diag(T.numpy()), expected, rtol=1e-9)
    assert np.count_nonzero(T.numpy() - np.diag(np.diag(T.numpy()))) == 0


def test_folded_model_equals_explicit_linear_on_mlp_output(tiny_llama64):
    batches = random_batches(n_batches=2, batch_size=4, seq_len=16, seed=1)
    pruner, adapter, selection, calibration = stages("replaceme_ls", {"alpha": 1e-3}, tiny_llama64, batches, 2)
    fits = pruner.fit(adapter, selection, calibration)
    ((block, T, _),) = fits
    reference = copy.deepcopy(tiny_llama64)
    linear = torch.nn.Linear(T.shape[0], T.shape[0], bias=False, dtype=torch.float64)
    linear.weight.data = T.T.clone()  # linear(x) = x @ T
    layers = reference.model.layers
    layers[block.start - 1].mlp.register_forward_hook(lambda mod, args, out: linear(out))
    reference.model.layers = torch.nn.ModuleList([layer for k, layer in enumerate(layers) if k not in block.layers])
    reference.config.num_hidden_layers = len(reference.model.layers)
    info = pruner.apply(adapter, selection, fits, calibration)
    assert info["new_parameters"] == 0 and info["blocks"][0]["folded_into_layer"] == block.start - 1
    for b in batches:
        with torch.no_grad():
            got = tiny_llama64(**b, use_cache=False).logits
            want = reference(**b, use_cache=False).logits
        real = b["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-10)


def test_rank_deficient_system_raises_and_leaves_weights_alone(tiny_llama64):
    batches = random_batches(n_batches=1, batch_size=1, seq_len=8, ragged=False)  # 8 tokens < 32 dims
    before = {k: v.clone() for k, v in tiny_llama64.state_dict().items()}
    with pytest.raises(NumericalError, match="singular.*alpha"):
        build_pruner("replaceme_ls").prune(adapter_for(tiny_llama64), CalibrationData(batches, 8), 2, progress=False)
    for k, v in tiny_llama64.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, before[k])


def test_block_may_not_start_at_layer_zero():
    with pytest.raises(ConfigError, match="min_start=0.*>= 1"):
        build_pruner("replaceme_ls", {"min_start": 0})
    with pytest.raises(ConfigError, match="min_start"):
        build_pruner("replaceme_cosine", {"min_start": 0})


@pytest.mark.parametrize("merge", [True, False])
def test_multi_block_selection_equals_brute_force_greedy(merge):
    L, n, count = 8, 2, 2
    model = build_tiny_model(tiny_llama_config(num_layers=L), seed=5).to(torch.float64)
    batches = random_batches(n_batches=3, seed=5)
    hs, last = residual_states_np(model, batches)
    d = {s: last_token_angular_distance_np(hs, last, s, n) for s in range(1, L - n + 1)}
    taken = []
    for s in sorted(d, key=lambda s: (d[s], s)):
        if all(s + n <= t or t + n <= s for t in taken):
            taken.append(s)
        if len(taken) == count:
            break
    expected = [[s, s + n] for s in sorted(taken)]
    if merge:
        merged = []
        for s, e in expected:
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        expected = merged
    _, _, selection, _ = stages("replaceme_cosine", {"num_blocks": count, "merge_consecutive": merge},
                                model, batches, n * count)
    assert [[b.start, b.end] for b in selection.blocks] == expected
    np.testing.assert_allclose(selection.scores["values"], list(d.values()), rtol=1e-10)


def test_ls_refuses_touching_unmerged_blocks():
    pruner = build_pruner("replaceme_ls", {"num_blocks": 2, "merge_consecutive": False})
    from depthbench.selection.blocks import Block
    with pytest.raises(ConfigError, match="merge_consecutive"):
        pruner.check_blocks([Block(2, 4), Block(4, 6)])


def cosine_objective(a, b):
    return float(np.mean(1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_cosine_transform_starts_at_identity_and_decreases(tiny_llama64, tmp_path):
    batches = random_batches(n_batches=3, batch_size=4, seq_len=16, seed=2)
    original = copy.deepcopy(tiny_llama64)
    options = {"lr": 3e-3, "epochs": 4, "batch_size": 32, "spill_dir": str(tmp_path)}
    result = build_pruner("replaceme_cosine", options).prune(adapter_for(tiny_llama64), CalibrationData(batches, 16),
                                                             2, progress=False)
    assert list(tmp_path.iterdir()) == []  # the spill files are gone
    (fit,) = result.replacement["blocks"]
    s, e = fit["block"]
    m, y, h = token_rows(original, batches, s - 1, e)
    np.testing.assert_allclose(fit["objective_at_identity"], cosine_objective(m, h - y), rtol=1e-5)
    # the pruned model's h_s is Y + M T: its objective, from an independent forward of the pruned model
    with torch.no_grad():
        mt = np.concatenate([tiny_llama64(**b, output_hidden_states=True).hidden_states[s][b["attention_mask"].bool()]
                             .numpy() for b in batches]) - y
    after = cosine_objective(mt, h - y)
    np.testing.assert_allclose(fit["objective_after"], after, rtol=1e-4)
    assert after < fit["objective_at_identity"] - 1e-4
    assert fit["epoch_losses"][-1] < fit["epoch_losses"][0]
    assert result.replacement["new_parameters"] == 0


def test_cosine_sequential_blocks_prune_and_run():
    model = build_tiny_model(tiny_llama_config(num_layers=8), seed=1)
    batches = random_batches(n_batches=2, seed=1)
    result = build_pruner("replaceme_cosine", {"num_blocks": 2, "merge_consecutive": False, "epochs": 1}).prune(
        adapter_for(model), CalibrationData(batches, 16), 2, progress=False)
    assert model.config.num_hidden_layers == 6 and len(result.removed_layers) == 2
    blocks = result.replacement["blocks"]
    assert [b["block"] for b in blocks] == [[b.start, b.end] for b in result.selection.blocks]
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def test_cosine_options_are_checked():
    with pytest.raises(ConfigError, match="loss='l1'"):
        build_pruner("replaceme_cosine", {"loss": "l1"})
    with pytest.raises(ConfigError, match="unknown option"):
        build_pruner("replaceme_ls", {"lr": 1e-3})


def test_ls_several_blocks_from_one_pass_each_equal_lstsq():
    model = build_tiny_model(tiny_llama_config(num_layers=8), seed=9).to(torch.float64)
    batches = random_batches(n_batches=3, batch_size=4, seq_len=16, seed=9)
    pruner, adapter, selection, calibration = stages("replaceme_ls", {"num_blocks": 2}, model, batches, 2)
    fits = pruner.fit(adapter, selection, calibration)
    assert [b for b, _, _ in fits] == selection.blocks
    for block, T, _ in fits:
        m, y, h = token_rows(model, batches, block.start - 1, block.end) if block.end < 8 else (None,) * 3
        if m is None:  # h_L is after the final norm in hidden_states: covered by the other tests
            continue
        expected = np.linalg.lstsq(m, h - y, rcond=None)[0]
        np.testing.assert_allclose(T.numpy(), expected, rtol=1e-9, atol=1e-11 * np.abs(expected).max())
    result = pruner.apply(adapter, selection, fits, calibration)
    assert [b["folded_into_layer"] for b in result["blocks"]] == [b.start - 1 for b in selection.blocks]
    assert model.config.num_hidden_layers == 6

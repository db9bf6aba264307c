"""LinearPatch: the Hadamard rotation from its definition, P, d against a direct float64 computation, the
reference selection, exactness of the interface patch (saved and reloaded), and its relation to Prune&Comp."""

import copy
from functools import partial
import json

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.statistics import collect
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.saving import CUSTOM_MODULES_FILE, load_pruned, save_pruned
from depthbench.pruners import build_pruner
from depthbench.pruners.methods.compensation import ChannelMagnitudeRatios, remove_and_compensate
from depthbench.pruners.hadamard import HadamardRotation, hadamard_factors, paley, sylvester
from depthbench.pruners.methods.linearpatch import patch_matrix
from tests.helpers import (SCALE_INVARIANT_NORM_EPS, build_tiny_model, padded_masks, random_batches,
                           real_token_logits, build_tiny_llama64, tiny_llama_config)
from tests.reference import residual_states_np

L, D = 7, 48  # 48 = 12 * 4: Paley I (q = 11) kron Sylvester 4


#: This file's model: keyword `seed` (default 3) and `tiny_llama_config` keywords pick the variant.
model64 = partial(build_tiny_llama64, seed=3, num_layers=L, hidden=D, head_dim=12,
                  rms_norm_eps=SCALE_INVARIANT_NORM_EPS)


@pytest.mark.parametrize("d", [1, 2, 16, 12, 20, 28, 36, 48, 576, 1536])
def test_rotation_is_orthonormal_and_hadamard(d):
    h_k, m = hadamard_factors(d)
    k = h_k.shape[0]
    assert k * m == d and not m & (m - 1)
    assert torch.equal(h_k @ h_k.T, k * torch.eye(k, dtype=torch.float64))  # H H^T = K I, exactly
    rotation = HadamardRotation(d)
    R = rotation.matrix()
    torch.testing.assert_close(R @ R.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(R.abs(), torch.full_like(R, d ** -0.5), rtol=0, atol=1e-15)
    x = torch.randn(5, 3, d, dtype=torch.float64)
    torch.testing.assert_close(rotation(x), x @ R, rtol=1e-12, atol=1e-12)


def test_paley_and_sylvester_constructions():
    assert torch.equal(sylvester(2), torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    assert paley(36) is not None and paley(9) is None and paley(16) is None
    assert hadamard_factors(576)[0].shape == (36, 36)  # SmolLM2: 36 * 16 (the reference's stored order 36)


def test_a_hidden_size_without_a_known_hadamard_is_refused_by_name(counting_collect):
    with pytest.raises(ConfigError, match="hidden size 92: .*insert_type=diag"):
        hadamard_factors(92)  # 92 = 23 * 4 = 46 * 2: no Paley order (order 92 exists, but not from Paley)
    model = build_tiny_llama64(num_layers=5, hidden=92, head_dim=46, num_attention_heads=2,
                               num_key_value_heads=1)
    with pytest.raises(ConfigError, match="hidden size 92"):
        build_pruner("linearpatch").prune(adapter_for(model), CalibrationData(random_batches(), 16), 2, progress=False)
    assert counting_collect == []
    build_pruner("linearpatch", {"insert_type": "diag"}).prune(adapter_for(model), CalibrationData(random_batches(),
                                                                                                   16), 2,
                                                               progress=False)


def test_patch_is_symmetric_and_diagonal_in_the_rotated_basis():
    R = HadamardRotation(D).matrix()
    d = torch.rand(D, dtype=torch.float64) + 0.5
    P = patch_matrix(d, R)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-14)
    x = torch.randn(9, D, dtype=torch.float64)
    torch.testing.assert_close((x @ P) @ R, (x @ R) * d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(patch_matrix(d, None), torch.diag(d))


def test_scale_equals_a_direct_computation_on_rotated_states():
    model = model64()
    batches = random_batches(n_batches=3, seed=5)
    rotation = HadamardRotation(D)
    (stat,) = collect(adapter_for(model), batches, [ChannelMagnitudeRatios([(2, 5)], rotation, rotation.name)],
                      progress=False)
    hs, _ = residual_states_np(model, batches)
    masks = padded_masks(batches)
    R = rotation.matrix().numpy()
    expected = np.mean([np.abs(hs[5][n][masks[n]] @ R).mean(0) / np.abs(hs[2][n][masks[n]] @ R).mean(0)
                        for n in range(masks.shape[0])], 0)
    np.testing.assert_allclose(stat.ratios((2, 5)).numpy(), expected, rtol=1e-10)


def test_constant_one_patch_leaves_the_pruned_logits_unchanged():
    model = model64()
    batches = random_batches(n_batches=2, seed=1)
    plain = copy.deepcopy(model)
    ModelSurgery(adapter_for(plain)).remove_layers([3, 4])
    surgery = ModelSurgery(adapter_for(model))
    surgery.remove_layers([3, 4])
    surgery.insert_residual_patch(2, patch_matrix(torch.ones(D, dtype=torch.float64), HadamardRotation(D).matrix()))
    assert surgery.residual_patch_layers() == [2]
    torch.testing.assert_close(real_token_logits(model, batches), real_token_logits(plain, batches),
                               rtol=1e-10, atol=1e-12)


def test_diag_patch_with_constant_scale_equals_the_prune_and_comp_fold():
    model = model64(tie=False)
    batches = random_batches(n_batches=2, seed=2)
    folded = copy.deepcopy(model)
    alpha = 1.37
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_layers([3, 4])
    ModelSurgery(adapter).insert_residual_patch(2, patch_matrix(torch.full((D,), alpha, dtype=torch.float64), None))
    remove_and_compensate(adapter_for(folded), 3, 5, alpha, "before")
    torch.testing.assert_close(real_token_logits(model, batches), real_token_logits(folded, batches),
                               rtol=1e-5, atol=1e-6)


def token_axis_cosine_np(hs, masks, s, e):
    values = []
    for n in range(masks.shape[0]):
        a, b = hs[s][n][masks[n]], hs[e][n][masks[n]]
        values.extend((a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)))
    return float(np.mean(values))


@pytest.mark.parametrize("cos_axis", ["tokens", "hidden"])
def test_reference_selection_and_patched_model_against_direct_computation(cos_axis):
    n = 2
    model = model64(seed=8)
    batches = random_batches(n_batches=3, seed=9)
    hs, _ = residual_states_np(model, batches)
    masks = padded_masks(batches)
    starts = list(range(1, L - n))  # layer 0 and blocks ending at L are never chosen
    if cos_axis == "tokens":
        values = [token_axis_cosine_np(hs, masks, s, s + n) for s in starts]
    else:
        values = []
        for s in starts:
            a, b = hs[s][masks], hs[s + n][masks]
            values.append(float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))))
    best = starts[int(np.argmax(values))]
    R = HadamardRotation(D).matrix().numpy()
    d = np.mean([np.abs(hs[best + n][k][masks[k]] @ R).mean(0) / np.abs(hs[best][k][masks[k]] @ R).mean(0)
                 for k in range(masks.shape[0])], 0)
    P = torch.from_numpy(R @ np.diag(d) @ R.T)
    # the reference: the plainly pruned model with an explicit h -> h P after layer best-1 (a hook, float64)
    reference = copy.deepcopy(model)
    ModelSurgery(adapter_for(reference)).remove_layers(range(best, best + n))
    reference.model.layers[best - 1].register_forward_hook(lambda module, args, output: output @ P)

    result = build_pruner("linearpatch", {"cos_axis": cos_axis}).prune(adapter_for(model),
                                                                       CalibrationData(batches, 16), n, progress=False)
    np.testing.assert_allclose(result.selection.scores["values"], values, rtol=1e-9)
    assert result.removed_layers == list(range(best, best + n))
    assert result.replacement["patches"][0]["after_layer"] == best - 1
    assert result.parameters_after["total"] == (result.parameters_before["total"]
                                                - n * result.parameters_before["per_layer"] + D * D)
    torch.testing.assert_close(real_token_logits(model, batches), real_token_logits(reference, batches),
                               rtol=1e-9, atol=1e-11)


def test_interface_patch_saves_needs_depthbench_and_reloads_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(tiny_llama_config(num_layers=L, hidden=D, head_dim=12), seed=4)  # float32
    batches = random_batches(n_batches=2, seed=3)
    result = build_pruner("linearpatch").prune(adapter_for(model), CalibrationData(batches, 16), 2, progress=False)
    assert result.replacement["custom_code_needed"] is True
    save_pruned(model, None, tmp_path / "pruned", result.to_dict())
    layers = json.loads((tmp_path / "pruned" / CUSTOM_MODULES_FILE).read_text())["residual_patch_layers"]
    assert layers == [result.replacement["patches"][0]["after_layer"]]
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned")
    assert ModelSurgery(adapter_for(reloaded)).residual_patch_layers() == layers
    torch.testing.assert_close(real_token_logits(reloaded, batches), real_token_logits(model, batches), rtol=0, atol=0)
    prompt = batches[0]["input_ids"][:1, :6]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(prompt, use_cache=True, **kwargs),
                       reloaded.generate(prompt, use_cache=False, **kwargs))


def test_mlp_fold_changes_only_the_down_projection_and_loads_plainly(tmp_path):
    from transformers import AutoModelForCausalLM

    model = model64(seed=6)
    original_down = {k: layer.mlp.down_proj.weight.clone() for k, layer in enumerate(model.model.layers)}
    batches = random_batches(n_batches=2, seed=6)
    result = build_pruner("linearpatch", {"placement": "mlp_fold", "insert_type": "diag"}).prune(
        adapter_for(model), CalibrationData(batches, 16), 2, progress=False)
    s = result.removed_layers[0]
    d = torch.tensor(result.selection.scores["patch_scale"][f"{s}-{s + 2}"], dtype=torch.float64)
    torch.testing.assert_close(model.model.layers[s - 1].mlp.down_proj.weight, d[:, None] * original_down[s - 1])
    assert result.parameters_after["total"] == result.parameters_before["total"] - 2 * result.parameters_before[
        "per_layer"]
    save_pruned(model, None, tmp_path / "plain", result.to_dict())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float64)
    torch.testing.assert_close(real_token_logits(plain, batches), real_token_logits(model, batches), rtol=0, atol=0)


def test_bad_options_are_refused():
    for key, value in [("cos_axis", "rows"), ("insert_type", "random"), ("placement", "head")]:
        with pytest.raises(ConfigError, match=f"linearpatch {key}='{value}'; allowed"):
            build_pruner("linearpatch", {key: value})
    with pytest.raises(ConfigError, match="compensate"):
        build_pruner("linearpatch", {}, compensate="magnitude")

"""The example plugins of docs/PLUGINS.md, run without installing them: each module is loaded from its file and
registered programmatically (what its entry point does once installed), then prunes a tiny random model.

examples/residual_map_pruner (adds parameters through `ModelSurgery`) is checked against an independent float64
computation from the model's own hidden states (``output_hidden_states``, not depthbench's hooks): the block chosen
from the cosine between h_s and h_{s+R}, the least-squares map solved here, and the model rebuilt by hand (layers
deleted from the list, a forward hook multiplying layer s-1's output by P). The installed path through the CLI is
tests/integration/test_plugin.py.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.saving import load_pruned, save_pruned
from depthbench.pruners import build_pruner, pruner_registry
from tests.helpers import build_tiny_model, random_batches, tiny_llama_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(folder: str, module: str, monkeypatch):
    """The plugin module, imported from its file under its own name (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(module, EXAMPLES / folder / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module, loaded)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture
def residual_map(monkeypatch):
    """The example registered as its entry point would register it (removed again after the test)."""
    module = _load("residual_map_pruner", "depthbench_residual_map_pruner", monkeypatch)
    name = module.ExampleResidualMapPruner.name
    assert f'{name} = "depthbench_residual_map_pruner:ExampleResidualMapPruner"' in (
        EXAMPLES / "residual_map_pruner" / "pyproject.toml").read_text()  # one declared name
    monkeypatch.setitem(pruner_registry._entries, name, module.ExampleResidualMapPruner)
    return name


def _hidden_states(model, batches) -> list[list[torch.Tensor]]:
    """Per batch, h_0..h_L at the real tokens (rows [N, d], float64); h_L before the final norm."""
    out = []
    with torch.no_grad():
        for batch in batches:
            h_last: dict = {}

            def keep(mod, args, output, h_last=h_last):
                h_last["h"] = output[0] if isinstance(output, tuple) else output

            hook = model.model.layers[-1].register_forward_hook(keep)
            hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
            hook.remove()
            mask = batch["attention_mask"].bool()
            states = [h[mask].to(torch.float64) for h in hidden[:-1]] + [h_last["h"][mask].to(torch.float64)]
            out.append(states)
    return out


def test_residual_map_example_equals_an_independent_float64_computation(residual_map, one_torch_thread):
    model = build_tiny_model(tiny_llama_config(num_layers=6, tie=False), seed=3, dtype=torch.float64)
    original = copy.deepcopy(model)
    batches = random_batches(n_batches=3, seed=5)
    n_remove, ridge = 2, 1e-3
    result = build_pruner(residual_map, {"ridge": ridge}).prune(adapter_for(model), CalibrationData(batches, 16),
                                                                n_remove, progress=False)
    states = _hidden_states(original, batches)
    x_all = [torch.cat([s[k] for s in states]) for k in range(7)]
    cos = [torch.nn.functional.cosine_similarity(x_all[s], x_all[s + n_remove], dim=-1).mean().item()
           for s in range(7 - n_remove)]
    start = max(range(1, len(cos)), key=lambda s: cos[s])
    assert result.removed_layers == list(range(start, start + n_remove))
    x, y = x_all[start], x_all[start + n_remove]
    d = x.shape[1]
    A = x.T @ x
    P = torch.linalg.solve(A + ridge * torch.trace(A) / d * torch.eye(d, dtype=torch.float64), x.T @ y)
    # the pruned model, rebuilt by hand: layers deleted from the list, layer start-1's output times P
    rebuilt = original
    rebuilt.model.layers = torch.nn.ModuleList(
        [layer for k, layer in enumerate(rebuilt.model.layers) if not start <= k < start + n_remove])
    for k, layer in enumerate(rebuilt.model.layers):
        layer.self_attn.layer_idx = k
    rebuilt.model.layers[start - 1].register_forward_hook(
        lambda mod, args, output: (output[0] @ P, *output[1:]) if isinstance(output, tuple) else output @ P)
    assert model.config.num_hidden_layers == 4 and result.parameters_after["total"] == (
        result.parameters_before["total"] - 2 * result.parameters_before["per_layer"] + d * d)
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(model(**batch, use_cache=False).logits,
                                       rebuilt(**batch, use_cache=False).logits, rtol=1e-9, atol=1e-9)


def test_residual_map_example_saves_and_reloads(residual_map, one_torch_thread, tmp_path):
    model = build_tiny_model(tiny_llama_config(num_layers=6))
    batches = random_batches(n_batches=2)
    result = build_pruner(residual_map).prune(adapter_for(model), CalibrationData(batches, 16), 2, progress=False)
    save_pruned(model, None, tmp_path / "pruned", result.to_dict())
    reloaded = load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batches[0], use_cache=False).logits,
                                   model(**batches[0], use_cache=False).logits, rtol=0, atol=0)


def test_random_example_runs_registered_programmatically(monkeypatch, one_torch_thread):
    import random

    module = _load("random_pruner", "depthbench_random_pruner", monkeypatch)
    monkeypatch.setitem(pruner_registry._entries, "example_random", module.ExampleRandomPruner)
    model = build_tiny_model(tiny_llama_config(num_layers=6))
    result = build_pruner("example_random", {"seed": 1}).prune(adapter_for(model), CalibrationData(random_batches(),
                                                                                                   16), 2,
                                                               progress=False)
    assert result.removed_layers == sorted(random.Random(1).sample(range(6), 2)) and len(model.model.layers) == 4

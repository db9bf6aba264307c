"""Refactors keep results: every registered method, rerun now, leaves the same model bit for bit as the record
made before model surgery moved out of `ModelAdapter` (docs/method_records_before.json, commit 38a8332).

`benchmarks/method_records.py` prunes tiny random Llama / GPT-2 / Gemma-2 models (plus option variants and
Prune&Comp) and records the removed units and SHA-256 digests of the pruned model's logits and state dict. The
digests depend on the torch / transformers versions that computed them: after an upgrade, re-record on the
old code first (``--output``), then compare.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "docs" / "method_records_before.json"


def _script():
    spec = importlib.util.spec_from_file_location("method_records", REPO / "benchmarks" / "method_records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_record_covers_every_registered_method():
    from depthbench.pruners import pruner_registry

    cells = json.loads(RECORD.read_text())["cells"]
    for family in ("llama", "gpt2"):
        assert {key.split("/")[1] for key in cells if key.startswith(f"{family}/") and "[" not in key
                and "+" not in key} == set(pruner_registry.names())


def test_every_method_leaves_the_same_model_bit_for_bit_as_before_the_refactor(one_torch_thread):
    script = _script()
    before = json.loads(RECORD.read_text())["cells"]
    now = script.record_all()
    assert script.differences(before, now) == []


def test_a_changed_bit_is_a_difference():
    script = _script()
    before = json.loads(RECORD.read_text())["cells"]
    changed = {key: dict(value) for key, value in before.items()}
    key = next(iter(changed))
    changed[key]["logits_sha256"] = "0" * 64
    assert script.differences(before, changed) == [f"{key}: logits_sha256 {before[key]['logits_sha256']!r} -> "
                                                   f"{'0' * 64!r}"]


SURGERY = ("remove_layers", "remove_units", "replace_layer", "untie_output_embeddings", "zero_attention_output",
           "set_attention_trainable", "fold_into_mlp_output", "transform_mlp_output_projection",
           "insert_mlp_output_linear", "fold_through_output_norm", "scale_residual_updates",
           "scale_embedding_output", "insert_residual_patch", "custom_modules")


@pytest.mark.parametrize("name", SURGERY)
def test_adapters_hold_no_surgery(name):
    """`ModelAdapter` and every registered family hold architecture access only; the change is `ModelSurgery`'s."""
    from depthbench.modeling.adapters import adapter_registry
    from depthbench.modeling.adapters.base import ModelAdapter
    from depthbench.modeling.surgery import ModelSurgery

    assert callable(getattr(ModelSurgery, name))
    for cls in [ModelAdapter, *(adapter_registry.get(t) for t in adapter_registry.names())]:
        assert not hasattr(cls, name), f"{cls.__name__}.{name}"
    assert "adapter" in inspect.signature(ModelSurgery).parameters

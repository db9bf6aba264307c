"""Baselines last_layers and random_layers: the reference's removed sets (test vectors and the reference's own
global-``random`` call), a pruned model equal to one rebuilt without those layers, and no calibration pass."""

import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.cache import StatisticsCache
from depthbench.calibration.service import open_service
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from depthbench.pruners.methods.baselines import last_layer_indices, random_layer_indices
from tests.helpers import REPO, build_tiny_model, random_batches, build_tiny_llama64, tiny_llama_config



def reference_random_removed(num_layers, n_remove, seed):
    """The reference's draw, as written (prune_llm.py): global random.seed, then sample the KEPT layers."""
    state = random.getstate()
    try:
        random.seed(seed)
        kept = sorted(random.sample(list(range(num_layers)), num_layers - n_remove))
    finally:
        random.setstate(state)
    return sorted(set(range(num_layers)) - set(kept))


def test_published_test_vectors():
    assert last_layer_indices(32, 8) == list(range(24, 32))
    assert last_layer_indices(32, 8, keep_last=True) == list(range(23, 31))
    assert random_layer_indices(32, 8, 42) == [5, 6, 10, 11, 15, 22, 25, 26]


@pytest.mark.parametrize("num_layers, n_remove", [(32, 8), (30, 8), (26, 6), (6, 1), (40, 20)])
@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_random_draw_equals_the_reference_call_and_leaves_global_state_alone(num_layers, n_remove, seed):
    random.seed(12345)
    state = random.getstate()
    removed = random_layer_indices(num_layers, n_remove, seed)
    assert random.getstate() == state
    assert removed == reference_random_removed(num_layers, n_remove, seed)


def _rebuilt_without(original_state, config_class, config_dict, removed, dtype):
    """A fresh model of depth L - R carrying the kept layers' weights, renumbered (independent of the surgery)."""
    kept = [k for k in range(config_dict["num_hidden_layers"]) if k not in removed]
    cfg = config_class.from_dict({**config_dict, "num_hidden_layers": len(kept)})
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    state = {}
    for name, tensor in original_state.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match:
            if int(match[1]) in removed:
                continue
            name = f"model.layers.{kept.index(int(match[1]))}.{match[2]}"
        state[name] = tensor
    model.load_state_dict(state, strict=True)
    return model


class ForwardCounter:
    """Counts calls of the model's forward (every calibration pass, NLL evaluation or replay runs it)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


@pytest.mark.parametrize("name, options, expected", [
    ("last_layers", {}, [5, 6, 7]),
    ("last_layers", {"keep_last": True}, [4, 5, 6]),
    ("random_layers", {}, reference_random_removed(8, 3, 42)),
    ("random_layers", {"seed": 7}, reference_random_removed(8, 3, 7)),
])
def test_pruned_model_equals_a_model_rebuilt_without_the_layers_and_runs_no_pass(name, options, expected, tmp_path):
    config = tiny_llama_config(num_layers=8)
    model = build_tiny_model(config, seed=3, dtype=torch.float64)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    original_config = model.config.to_dict()  # the surgery edits the config in place
    batches = random_batches(n_batches=2, seed=3)
    counter = ForwardCounter(model)
    # through a cached service, as the pipeline builds it, and through plain calibration data
    cache = StatisticsCache(tmp_path / "statistics", "tiny-fingerprint")
    pruner = build_pruner(name, options)
    with pruner.service(adapter_for(model), CalibrationData(batches, 16), cache=cache, progress=False) as service:
        result = pruner.prune(service.adapter, service, 3)
    assert counter.calls == 0
    assert result.removed_layers == expected
    assert result.budget["calibration_tokens"] == 0
    assert result.to_dict()["removed_attention_modules"] == 3 and result.to_dict()["removed_sub_blocks"] == []
    assert model.config.num_hidden_layers == 5

    rebuilt = _rebuilt_without(original_state, type(config), original_config, set(expected), torch.float64)
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(model(**batch, use_cache=False).logits,
                                       rebuilt(**batch, use_cache=False).logits, rtol=0, atol=0)

    again = build_tiny_llama64(num_layers=8, seed=3)
    counter = ForwardCounter(again)
    build_pruner(name, options).prune(adapter_for(again), CalibrationData(batches, 16), 3, progress=False)
    assert counter.calls == 0


def test_the_forward_counter_sees_a_method_that_reads_calibration(tmp_path):
    model = build_tiny_model(tiny_llama_config(num_layers=8), seed=3)
    counter = ForwardCounter(model)
    result = build_pruner("shortgpt").prune(adapter_for(model), CalibrationData(random_batches(n_batches=2), 16), 3,
                                            progress=False)
    assert counter.calls == 2 and result.budget["calibration_tokens"] > 0
    with open_service(adapter_for(model), CalibrationData(random_batches(n_batches=2), 16), progress=False) as s:
        s.nll()
    assert counter.calls == 4


def test_keep_last_at_the_largest_removal_keeps_only_the_final_layer():
    assert last_layer_indices(8, 7, keep_last=True) == list(range(0, 7))
    assert last_layer_indices(8, 7) == list(range(1, 8))


def test_baselines_use_only_the_public_pruner_interface():
    from tests.reference import third_party_imports

    depthbench = third_party_imports(REPO / "pruners" / "methods" / "baselines.py")
    assert depthbench == {"depthbench.pruners"}, depthbench


def test_calibration_tokens_are_counted_when_prune_and_comp_reads_the_data():
    model = build_tiny_model(tiny_llama_config(num_layers=8), seed=3)
    pruner = build_pruner("last_layers", {"keep_last": True}, compensate="magnitude", compensate_mode="post")
    counter = ForwardCounter(model)
    result = pruner.prune(adapter_for(model), CalibrationData(random_batches(n_batches=2), 16), 3, progress=False)
    assert result.removed_layers == [4, 5, 6] and counter.calls > 0
    assert result.budget["calibration_tokens"] > 0


@pytest.mark.parametrize("name", ["last_layers", "random_layers"])
def test_iterative_compensation_is_refused_for_a_baseline_post_is_allowed(name):
    """Iterative Prune&Comp re-scores the method after each removal: meaningless for a method that does not
    look at the model (it would not reproduce the baseline's own set), so it is refused with the way out."""
    from depthbench.errors import ConfigError

    with pytest.raises(ConfigError, match="allowed for it: compensate_mode=post"):
        build_pruner(name, {}, compensate="magnitude")
    assert build_pruner(name, {}, compensate="magnitude", compensate_mode="post").settings.active

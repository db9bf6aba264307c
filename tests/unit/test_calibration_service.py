"""The calibration service that stateless pruners talk to, and options declared once."""

import copy

import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.service import CalibrationService
from depthbench.calibration.statistics import PairwiseSimilarity, collect
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners import build_pruner, pruner_registry
from tests.helpers import random_batches, build_tiny_llama64
from tests.reference import nll_float64


@pytest.fixture
def model64():
    return build_tiny_llama64(num_layers=6, hidden=16)


@pytest.mark.parametrize("skip", [[], [2], [1, 4]])
def test_nll_with_units_skipped_equals_a_model_built_without_them(model64, skip):
    batches = random_batches(n_batches=2, batch_size=4, seq_len=12)
    before = copy.deepcopy(model64.state_dict())
    service = CalibrationService(adapter_for(model64), CalibrationData(batches, 12), progress=False)
    got = service.nll(skip=skip)
    rebuilt = copy.deepcopy(model64)
    ModelSurgery(adapter_for(rebuilt)).remove_layers(skip)
    assert got == pytest.approx(nll_float64(rebuilt, batches), rel=1e-12, abs=0)
    after = model64.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "skipping changed a weight"
    assert service.nll() == pytest.approx(nll_float64(model64, batches), rel=1e-12, abs=0)


def test_current_statistics_with_skipped_units_equal_the_rebuilt_model(model64):
    batches = random_batches(n_batches=2, batch_size=4, seq_len=12)
    service = CalibrationService(adapter_for(model64), CalibrationData(batches, 12), progress=False)
    (skipped,) = service.current([PairwiseSimilarity(5, gap=1, tokens="all")], skip=[3])
    rebuilt = copy.deepcopy(model64)
    ModelSurgery(adapter_for(rebuilt)).remove_layers([3])
    (expected,) = collect(adapter_for(rebuilt), batches, [PairwiseSimilarity(5, gap=1, tokens="all")], progress=False)
    torch.testing.assert_close(skipped.mean_cosine(), expected.mean_cosine(), rtol=1e-12, atol=0)


def test_original_statistics_are_refused_once_the_model_changed(model64):
    adapter = adapter_for(model64)
    service = CalibrationService(adapter, CalibrationData(random_batches(n_batches=1), 16), progress=False)
    service.original([PairwiseSimilarity(6, gap=1, tokens="all")])
    ModelSurgery(adapter).remove_layers([0])
    with pytest.raises(RuntimeError, match="after it was changed.*current"):
        service.original([PairwiseSimilarity(5, gap=1, tokens="all")])


@pytest.mark.parametrize("name, options", [("uidl", {}), ("shortgpt", {}), ("replaceme_ls", {}),
                                           ("replaceme_cosine", {"epochs": 1}), ("llm_streamline", {"max_steps": 1})])
def test_a_pruner_holds_its_options_and_nothing_else(model64, name, options):
    pruner = build_pruner(name, options)
    state = copy.deepcopy(vars(pruner))
    pruner.prune(adapter_for(model64), CalibrationData(random_batches(n_batches=2, batch_size=4), 16), 2,
                 progress=False)
    assert vars(pruner) == state and set(state) == {"options"}


@pytest.mark.parametrize("options, message", [
    ({"lr": "abc"}, r"option lr='abc'.*Float"),
    ({"epochs": 1.5}, r"option epochs=1.5.*Integer"),
    ({"epochs": True}, r"option epochs=True.*Integer"),
    ({"bogus": 1}, r"unknown option\(s\) bogus for pruner 'replaceme_cosine'; allowed: .*lr"),
])
def test_options_are_checked_against_their_declaration(options, message):
    with pytest.raises(ConfigError, match=message):
        build_pruner("replaceme_cosine", options)


def test_every_option_is_documented():
    import dataclasses

    for name in pruner_registry.names():
        for field in dataclasses.fields(pruner_registry.get(name).Options):
            assert field.metadata.get("help"), f"{name}.{field.name} has no documentation"

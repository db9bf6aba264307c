"""The config tree composes: every group entry, presets and launcher configs."""

from pathlib import Path

import pytest
import dataclasses

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from depthbench.config_store import register_configs
from depthbench.pruners import build_pruner, pruner_registry

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(*overrides, hydra_cfg=False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("group", ["model", "calibration", "logger", "scale"])
def test_every_group_entry_composes(group):
    for entry in sorted((CONF / group).glob("*.yaml")):
        cfg = _compose(f"{group}={entry.stem}")
        assert group == "scale" or cfg[group] is not None


@pytest.mark.parametrize("name", pruner_registry.names())
def test_every_pruner_entry_composes_and_builds(name):
    """``pruner=<name>`` is the method's Options dataclass: its defaults compose, and build the pruner."""
    cfg = _compose(f"pruner={name}")
    assert cfg.pruner.name == name
    options = OmegaConf.to_container(cfg.pruner.options)
    assert options == dataclasses.asdict(pruner_registry.get(name).Options())
    assert build_pruner(name, options).name == name


def test_hydra_refuses_a_mistyped_or_unknown_pruner_option():
    with pytest.raises(ConfigCompositionException, match="lr=abc"):
        _compose("pruner=replaceme_cosine", "pruner.options.lr=abc")
    with pytest.raises(ConfigCompositionException, match="bogus"):
        _compose("pruner=uidl", "pruner.options.bogus=1")


def test_launchers_compose():
    slurm = _compose("hydra/launcher=slurm", hydra_cfg=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
    joblib = _compose("hydra/launcher=local_parallel", hydra_cfg=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2


def test_variant_overrides_pruner():
    cfg = _compose("+variant=ls_diag")
    assert cfg.pruner.name == "replaceme_ls" and cfg.pruner.options.diag is True
    cfg = _compose("+variant=cosine_accurate")
    assert cfg.pruner.name == "replaceme_cosine" and cfg.pruner.options.accurate is True


def test_fast_scale_shrinks_budgets():
    cfg = _compose("scale=fast")
    assert cfg.calibration.n_samples == 8 and cfg.evaluation.perplexity.max_windows == 2

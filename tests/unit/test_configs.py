"""The config tree composes: every group entry, presets and launcher configs."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(*overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("group", ["model", "pruner", "calibration", "logger", "scale"])
def test_every_group_entry_composes(group):
    for entry in sorted((CONF / group).glob("*.yaml")):
        cfg = _compose(f"{group}={entry.stem}")
        assert group == "scale" or cfg[group] is not None


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

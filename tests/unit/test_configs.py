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
    options = OmegaConf.to_container(cfg.pruner.options, resolve=True)
    assert options == dataclasses.asdict(pruner_registry.get(name).Options())
    assert build_pruner(name, options).name == name


def test_hydra_refuses_a_mistyped_or_unknown_pruner_option():
    with pytest.raises(ConfigCompositionException, match="lr=abc"):
        _compose("pruner=replaceme_cosine", "pruner.options.lr=abc")
    with pytest.raises(ConfigCompositionException, match="bogus"):
        _compose("pruner=uidl", "pruner.options.bogus=1")


@pytest.mark.parametrize("name", ["replaceme_cosine", "llm_streamline"])
def test_a_trained_methods_seed_follows_the_run_seed(name):
    """``seed=3`` reseeds the row / sequence shuffling and held-out split of the methods that train (their
    ``pruner.options.seed``); an explicit ``pruner.options.seed`` still wins; the random baseline's draw keeps
    its own documented axis (reference seed 42)."""
    assert OmegaConf.to_container(_compose(f"pruner={name}", "seed=3").pruner.options, resolve=True)["seed"] == 3
    assert _compose(f"pruner={name}", "seed=3", "pruner.options.seed=5").pruner.options.seed == 5
    assert _compose("pruner=random_layers", "seed=3").pruner.options.seed == 42


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


def test_paths_group_places_runs_sweeps_and_caches(tmp_path, monkeypatch):
    """One `paths` group decides where runs, sweeps and caches go (no path derived elsewhere)."""
    from depthbench.experiments.resume import config_hash
    from depthbench.paths import run_paths

    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = _compose(f"paths.output_dir={out}", f"paths.cache_dir={cache}", "experiment=leaderboard", hydra_cfg=True)
    assert str(cfg.hydra.run.dir).startswith(f"{out}/runs/")
    assert cfg.hydra.sweep.dir == f"{out}/sweeps/leaderboard"
    paths = run_paths(cfg)
    assert paths.models_dir == cache / "models" and paths.data_dir == cache
    assert paths.shared_cache(None) == cache and paths.shared_cache(tmp_path / "sweep") == tmp_path / "sweep" / ".cache"
    assert run_paths(_compose(f"cache.dir={tmp_path / 'shared'}")).statistics_dir(tmp_path) == \
        tmp_path / "shared" / "statistics"
    monkeypatch.setenv("DEPTHBENCH_CACHE", str(tmp_path / "env"))
    assert run_paths(_compose()).cache_dir == tmp_path / "env"  # null: the environment's user cache
    # where things are written is not what a result depends on: the resume hash ignores it
    assert config_hash(_compose(f"paths.output_dir={out}")) == config_hash(_compose())


def test_default_compensation_keeps_earlier_config_hashes():
    """Prune&Comp off (the default) hashes as a config without the compensate keys (earlier sweeps resume);
    turning it on changes the hash."""
    from omegaconf import OmegaConf

    from depthbench.experiments.resume import config_hash

    cfg = _compose("pruner=shortgpt")
    data = OmegaConf.to_container(cfg, resolve=True)
    data["pruner"] = {k: v for k, v in data["pruner"].items() if not k.startswith("compensate")}
    assert config_hash(cfg) == config_hash(data)
    assert config_hash(_compose("pruner=shortgpt", "pruner.compensate=magnitude")) != config_hash(cfg)


def test_in_memory_default_keeps_earlier_config_hashes():
    """``model.layerwise=false`` (the default) hashes as a config without the layer-wise keys, whatever the buffer
    size; turning it on changes the hash, its buffer size (where activations live) does not."""
    from omegaconf import OmegaConf

    from depthbench.experiments.resume import config_hash

    cfg = _compose("model=hf", "model.name_or_path=/m")
    data = OmegaConf.to_container(cfg, resolve=True)
    data["model"] = {k: v for k, v in data["model"].items() if not k.startswith("layerwise")}
    assert config_hash(cfg) == config_hash(data)
    assert config_hash(_compose("model=hf", "model.name_or_path=/m", "model.layerwise_buffer_gb=3")) == config_hash(cfg)
    layerwise = config_hash(_compose("model=hf", "model.name_or_path=/m", "model.layerwise=true"))
    assert layerwise != config_hash(cfg)
    assert config_hash(_compose("model=hf", "model.name_or_path=/m", "model.layerwise=true",
                                "model.layerwise_buffer_gb=3")) == layerwise


@pytest.mark.parametrize("preset", ["leaderboard", "ratio_sweep"])
def test_method_grids_cover_every_builtin_method(preset):
    """The leaderboard and ratio-sweep presets sweep every built-in method and baseline (not a hand-kept subset
    that silently misses a new one)."""
    from depthbench.pruners import pruner_registry

    builtin = {name for name in pruner_registry.names()
               if pruner_registry.get(name).__module__.startswith("depthbench.")}
    swept = _compose(f"experiment={preset}", hydra_cfg=True).hydra.sweeper.params.pruner.split(",")
    assert len(swept) == len(set(swept)) and set(swept) == builtin
    assert len(builtin) == 16


@pytest.mark.parametrize("name", ["replaceme_cosine", "llm_streamline"])
def test_converged_scale_sets_the_trained_methods_budgets(name):
    """scale=converged takes each trained method's budget from conf/budget/converged_<name>.yaml (the values the
    reproduction study found flat); other methods are untouched, and the command line still wins."""
    budget = OmegaConf.load(CONF / "budget" / f"converged_{name}.yaml").pruner.options
    cfg = _compose(f"pruner={name}", "scale=converged")
    default = _compose(f"pruner={name}")
    assert budget and all(cfg.pruner.options[k] == v for k, v in budget.items())
    assert any(default.pruner.options[k] != v for k, v in budget.items())
    key = next(iter(budget))
    assert _compose(f"pruner={name}", "scale=converged", f"pruner.options.{key}=3").pruner.options[key] == 3
    assert build_pruner(name, OmegaConf.to_container(cfg.pruner.options, resolve=True)).name == name
    assert _compose("pruner=uidl", "scale=converged").pruner == _compose("pruner=uidl").pruner


def test_cache_settings_parse_the_yaml_and_refuse_bad_values_naming_them(tmp_path):
    """``cache`` is parsed once into typed settings whose defaults are the YAML's (no fallback in code), and a bad
    value stops the run's config check naming the key, the value and what is allowed."""
    from depthbench.errors import ConfigError
    from depthbench.experiments.cache_settings import CacheSettings
    from depthbench.experiments.pipeline import validate

    yaml = OmegaConf.load(CONF / "config.yaml").cache
    settings = CacheSettings.from_config(_compose().cache)
    assert settings.activations_gb == yaml.activations_gb == "auto"
    assert settings.lock_stale_s == yaml.lock_stale_s and settings.statistics is True
    assert CacheSettings.from_config({**OmegaConf.to_container(yaml), "activations_gb": 0.5}).activation_budget() \
        == 512 * 1024**2
    for key, value, allowed in (("activations_gb", "lots", "auto, or a number of GiB >= 0"),
                                ("lock_stale_s", 0, "a number of seconds > 0"), ("statistics", "yes", "true, false")):
        with pytest.raises(ConfigError, match=rf"cache.{key}={value!r}; allowed: {allowed}"):
            validate(_compose(f"cache.{key}={value}", "logger=none"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ["sleb", "shortened_ppl", "blockpruner", "finercut"])
def test_a_candidate_subset_larger_than_the_calibration_set_is_refused_from_the_config(name, tmp_path):
    from depthbench.errors import ConfigError
    from depthbench.experiments.pipeline import validate

    with pytest.raises(ConfigError, match=rf"{name} score_samples=9: calibration.n_samples is 8; allowed: 0 \(all\) "
                                          r"or at most 8"):
        validate(_compose(f"pruner={name}", "pruner.options.score_samples=9", "calibration.n_samples=8",
                          "logger=none"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_cpu_scale_declares_candidate_subsets_and_the_converged_training_budgets():
    """scale=cpu (make leaderboard-all): the default calibration; the per-candidate methods score on the subset their
    conf/budget/cpu_<name>.yaml declares; the trained methods get exactly scale=converged's budgets; others: the
    defaults."""
    for name in ("sleb", "shortened_ppl", "blockpruner", "finercut"):
        declared = OmegaConf.load(CONF / "budget" / f"cpu_{name}.yaml").pruner.options.score_samples
        cfg = _compose(f"pruner={name}", "scale=cpu")
        assert cfg.pruner.options.score_samples == declared > 0 and cfg.calibration.n_samples == 128
    for name in ("llm_streamline", "replaceme_cosine"):
        converged = _compose(f"pruner={name}", "scale=converged").pruner.options
        assert _compose(f"pruner={name}", "scale=cpu").pruner.options == converged
    assert _compose("pruner=uidl", "scale=cpu").pruner.options == _compose("pruner=uidl").pruner.options


def test_a_path_override_names_one_cell_folder_not_a_nest():
    """A sweep cell's folder is its overrides with path separators replaced: ``calibration.path=/data/x.jsonl``
    does not nest the cell several folders below the sweep."""
    from omegaconf import open_dict

    cfg = _compose("ratio=0.1", hydra_cfg=True)
    with open_dict(cfg):
        cfg.hydra.job.override_dirname = "calibration.path=/data/x.jsonl,ratio=0.1"
    assert cfg.hydra.sweep.subdir == "calibration.path=_data_x.jsonl,ratio=0.1"
    with open_dict(cfg):
        cfg.hydra.job.override_dirname = "pruner=uidl,ratio=0.25"
    assert cfg.hydra.sweep.subdir == "pruner=uidl,ratio=0.25"  # names without a path are unchanged (resume)


def test_a_long_cell_folder_name_fits_a_path_component_and_stays_unique():
    """Many overrides with a long path make a name over the file system's 255-byte component limit: the folder
    name is cut to `FOLDER_NAME_MAX_BYTES` with a hash of the whole name, the same on every call (resume), and two
    cells that differ only at the end get different folders."""
    from depthbench.config_store import FOLDER_NAME_MAX_BYTES, folder_name

    common = "benchmark=none,calibration.n_samples=2,model.name_or_path=/tmp/" + "x" * 150 + ",model=hf"
    first, second = folder_name(common + ",ratio=0.125"), folder_name(common + ",ratio=0.25")
    assert len(first.encode()) <= FOLDER_NAME_MAX_BYTES < 255
    assert first != second and first == folder_name(common + ",ratio=0.125")
    assert "/" not in first and first.startswith("benchmark=none,calibration.n_samples=2,model.name_or_path=_tmp_")
    accented = folder_name("calibration.path=/données/" + "é" * 200)  # a cut never splits a multi-byte character
    assert len(accented.encode()) <= FOLDER_NAME_MAX_BYTES and accented.encode().decode() == accented

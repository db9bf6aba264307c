"""The config tree composes: every group entry, presets and launcher configs."""

import dataclasses
import shutil
import subprocess
import sys

import pytest

from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from depthbench.pruners import build_pruner, pruner_registry
from depthbench.pruners.methods.uidl import UIDLPruner
from tests.helpers import CONF, REPO, compose, swept_values


@pytest.mark.parametrize("group", ["model", "calibration", "logger", "scale"])
def test_every_group_entry_composes(group):
    for entry in sorted((CONF / group).glob("*.yaml")):
        cfg = compose(f"{group}={entry.stem}")
        assert group == "scale" or cfg[group] is not None


@pytest.mark.parametrize("name", pruner_registry.names())
def test_every_pruner_entry_composes_and_builds(name):
    """``pruner=<name>`` is the method's Options dataclass: its defaults compose, and build the pruner."""
    cfg = compose(f"pruner={name}")
    assert cfg.pruner.name == name
    options = OmegaConf.to_container(cfg.pruner.options, resolve=True)
    assert options == dataclasses.asdict(pruner_registry.get(name).Options())
    assert build_pruner(name, options).name == name


def test_hydra_refuses_a_mistyped_or_unknown_pruner_option():
    with pytest.raises(ConfigCompositionException, match="lr=abc"):
        compose("pruner=replaceme_cosine", "pruner.options.lr=abc")
    with pytest.raises(ConfigCompositionException, match="bogus"):
        compose("pruner=uidl", "pruner.options.bogus=1")


@pytest.mark.parametrize("name", ["replaceme_cosine", "llm_streamline"])
def test_a_trained_methods_seed_follows_the_run_seed(name):
    """``seed=3`` reseeds the row / sequence shuffling and held-out split of the methods that train (their
    ``pruner.options.seed``); an explicit ``pruner.options.seed`` still wins; the random baseline's draw keeps
    its own documented axis (reference seed 42)."""
    assert OmegaConf.to_container(compose(f"pruner={name}", "seed=3").pruner.options, resolve=True)["seed"] == 3
    assert compose(f"pruner={name}", "seed=3", "pruner.options.seed=5").pruner.options.seed == 5
    assert compose("pruner=random_layers", "seed=3").pruner.options.seed == 42


def test_launcherscompose():
    slurm = compose("hydra/launcher=slurm", hydra_cfg=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
    joblib = compose("hydra/launcher=local_parallel", hydra_cfg=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2


def test_variant_overrides_pruner():
    cfg = compose("+variant=ls_diag")
    assert cfg.pruner.name == "replaceme_ls" and cfg.pruner.options.diag is True
    cfg = compose("+variant=cosine_accurate")
    assert cfg.pruner.name == "replaceme_cosine" and cfg.pruner.options.accurate is True


def test_fast_scale_shrinks_budgets():
    cfg = compose("scale=fast")
    assert cfg.calibration.n_samples == 8 and cfg.evaluation.perplexity.max_windows == 2


def test_paths_group_places_runs_sweeps_and_caches(tmp_path, monkeypatch):
    """One `paths` group decides where runs, sweeps and caches go (no path derived elsewhere)."""
    from depthbench.experiments.resume import config_hash
    from depthbench.paths import run_paths

    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = compose(f"paths.output_dir={out}", f"paths.cache_dir={cache}", "experiment=leaderboard", hydra_cfg=True)
    assert str(cfg.hydra.run.dir).startswith(f"{out}/runs/")
    assert cfg.hydra.sweep.dir == f"{out}/sweeps/leaderboard"
    paths = run_paths(cfg)
    assert paths.models_dir == cache / "models" and paths.data_dir == cache
    assert paths.shared_cache(None) == cache and paths.shared_cache(tmp_path / "sweep") == tmp_path / "sweep" / ".cache"
    assert run_paths(compose(f"cache.dir={tmp_path / 'shared'}")).statistics_dir(tmp_path) == \
        tmp_path / "shared" / "statistics"
    monkeypatch.setenv("DEPTHBENCH_CACHE", str(tmp_path / "env"))
    assert run_paths(compose()).cache_dir == tmp_path / "env"  # null: the environment's user cache
    # where things are written is not what a result depends on: the resume hash ignores it
    assert config_hash(compose(f"paths.output_dir={out}")) == config_hash(compose())


def test_default_compensation_keeps_earlier_config_hashes():
    """Prune&Comp off (the default) hashes as a config without the compensate keys (earlier sweeps resume);
    turning it on changes the hash."""
    from omegaconf import OmegaConf

    from depthbench.experiments.resume import config_hash

    cfg = compose("pruner=shortgpt")
    data = OmegaConf.to_container(cfg, resolve=True)
    data["pruner"] = {k: v for k, v in data["pruner"].items() if not k.startswith("compensate")}
    assert config_hash(cfg) == config_hash(data)
    assert config_hash(compose("pruner=shortgpt", "pruner.compensate=magnitude")) != config_hash(cfg)


def test_in_memory_default_keeps_earlier_config_hashes():
    """``model.layerwise=false`` (the default) hashes as a config without the layer-wise keys, whatever the buffer
    size; turning it on changes the hash, its buffer size (where activations live) does not."""
    from omegaconf import OmegaConf

    from depthbench.experiments.resume import config_hash

    cfg = compose("model=hf", "model.name_or_path=/m")
    data = OmegaConf.to_container(cfg, resolve=True)
    data["model"] = {k: v for k, v in data["model"].items() if not k.startswith("layerwise")}
    assert config_hash(cfg) == config_hash(data)
    assert config_hash(compose("model=hf", "model.name_or_path=/m", "model.layerwise_buffer_gb=3")) == config_hash(cfg)
    layerwise = config_hash(compose("model=hf", "model.name_or_path=/m", "model.layerwise=true"))
    assert layerwise != config_hash(cfg)
    assert config_hash(compose("model=hf", "model.name_or_path=/m", "model.layerwise=true",
                                "model.layerwise_buffer_gb=3")) == layerwise


def _builtin_pruners() -> set[str]:
    return {name for name in pruner_registry.names() if pruner_registry.get(name).__module__.startswith("depthbench.")}


#: What each method-grid preset leaves out of the registry's methods, written here independently of the YAML (whose
#: comments say why): a method that a preset should run but does not, or runs but should not, fails the test below.
PRESET_EXCLUSIONS = {
    "leaderboard": set(),
    "ratio_sweep": set(),
    "healing": {"sleb", "shortened_ppl", "blockpruner", "finercut", "shortened_taylor", "llm_drop", "laco",
                "linearpatch", "mka", "last_layers", "random_layers"},
}


@pytest.mark.parametrize("preset", sorted(PRESET_EXCLUSIONS))
def test_method_grids_are_the_registry_minus_declared_exclusions(preset):
    """The presets sweep the pruner registry's methods as Hydra expands them (not a hand-kept list that silently
    misses a new method): every built-in method and baseline but the preset's declared exclusions."""
    builtin = _builtin_pruners()
    assert len(builtin) == 16 and PRESET_EXCLUSIONS[preset] <= builtin
    swept = swept_values(f"experiment={preset}")
    assert len(swept) == len(set(swept)) and set(swept) == builtin - PRESET_EXCLUSIONS[preset]


def test_method_grids_run_today_what_they_ran_before_they_were_derived():
    """The lists the presets held when they were hand-written (the derived grids run the same methods)."""
    every = {"replaceme_ls", "replaceme_cosine", "uidl", "llm_streamline", "shortgpt", "sleb", "shortened_ppl",
             "shortened_taylor", "llm_drop", "blockpruner", "finercut", "laco", "linearpatch", "mka", "last_layers",
             "random_layers"}
    assert set(swept_values("experiment=leaderboard")) == set(swept_values("experiment=ratio_sweep")) == every
    assert set(swept_values("experiment=healing")) == {"replaceme_ls", "replaceme_cosine", "uidl", "llm_streamline",
                                                       "shortgpt"}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_makefiles_method_subsets_and_make_methods_name_registered_pruners(tmp_path):
    """The Makefile's chosen subsets (the demo's methods, the seeded leaderboard methods) name registered pruners, and
    `make methods` prints the registry (its recipe run here through a wrapper, without the `install` prerequisite)."""
    wrapper = tmp_path / "wrapper.mk"
    wrapper.write_text(f"include {REPO / 'Makefile'}\nt:\n\t@echo $(DEMO_METHODS) $(LEADERBOARD_SEED_METHODS)\n"
                       f"m:\n\t@$(PRINT_METHODS)\n")
    out = subprocess.run(["make", "-s", "-f", str(wrapper), "t", f"PY={sys.executable}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    subsets = [set(v.split(",")) for v in out]
    assert len(subsets) == 2 and all(s and s <= _builtin_pruners() for s in subsets)
    printed = subprocess.run(["make", "-s", "-f", str(wrapper), "m", f"PY={sys.executable}"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed.split(",") == sorted(pruner_registry.names())


class PluginMethod(UIDLPruner):
    """A stand-in for an installed plugin pruner (registered below as the entry point group would register it)."""

    name = "plugin_method"


def test_a_plugin_pruner_joins_the_method_grids(monkeypatch):
    """A pruner installed through the ``depthbench.pruners`` entry point is a ``pruner=<name>`` option, so the presets
    that sweep the registry run it too (and a preset's explicit exclusions do not drop it)."""
    from hydra.core.config_store import ConfigStore

    pruner_registry.names()  # the installed entry points are read once; the plugin is then added as they would be
    monkeypatch.setattr(pruner_registry, "_entries",
                        {**pruner_registry._entries, "plugin_method": f"{__name__}:PluginMethod"})
    monkeypatch.setattr(pruner_registry, "_from_entry_points", {*pruner_registry._from_entry_points, "plugin_method"})
    try:
        for preset in PRESET_EXCLUSIONS:
            assert "plugin_method" in swept_values(f"experiment={preset}"), preset
    finally:
        monkeypatch.undo()
        ConfigStore.instance().repo["pruner"].pop("plugin_method.yaml", None)
    assert "plugin_method" not in swept_values("experiment=leaderboard")  # other tests see the built-ins only


@pytest.mark.parametrize("name", ["replaceme_cosine", "llm_streamline"])
def test_converged_scale_sets_the_trained_methods_budgets(name):
    """scale=converged takes each trained method's budget from conf/budget/pruner/converged_<name>.yaml (the values the
    reproduction study found flat); other methods are untouched, and the command line still wins."""
    budget = OmegaConf.load(CONF / "budget" / "pruner" / f"converged_{name}.yaml").pruner.options
    cfg = compose(f"pruner={name}", "scale=converged")
    default = compose(f"pruner={name}")
    assert budget and all(cfg.pruner.options[k] == v for k, v in budget.items())
    assert any(default.pruner.options[k] != v for k, v in budget.items())
    key = next(iter(budget))
    assert compose(f"pruner={name}", "scale=converged", f"pruner.options.{key}=3").pruner.options[key] == 3
    assert build_pruner(name, OmegaConf.to_container(cfg.pruner.options, resolve=True)).name == name
    assert compose("pruner=uidl", "scale=converged").pruner == compose("pruner=uidl").pruner


def test_cache_settings_are_typed_at_composition_and_range_checked_before_any_weights(tmp_path):
    """``cache`` has one default per setting (CacheSettings in depthbench/settings.py, the schema the primary config
    extends; conf/config.yaml repeats none), a mistyped or unknown key is refused when Hydra composes, and a value
    of the right type out of range stops the run's config check naming the key, the value and what is allowed."""
    import dataclasses

    from hydra.errors import ConfigCompositionException

    from depthbench.errors import ConfigError
    from depthbench.experiments.pipeline import validate
    from depthbench.settings import CacheSettings

    assert "cache:" not in (CONF / "config.yaml").read_text()
    settings = CacheSettings.from_config(compose().cache)
    assert settings == CacheSettings(lock_stale_s=300.0)  # the declared defaults (lock_stale_s as a float)
    assert settings.activations_gb == "auto" and settings.statistics is True
    assert dataclasses.replace(settings, activations_gb=0.5).activation_budget() == 512 * 1024**2
    for override in ("cache.statistics=maybe", "cache.colour=blue", "efficiency.repeats=many", "resume=sometimes"):
        with pytest.raises(ConfigCompositionException):
            compose(override)
    for key, value, allowed in (("activations_gb", "lots", "auto, or a number of GiB >= 0"),
                                ("lock_stale_s", 0, "a number of seconds > 0")):
        with pytest.raises(ConfigError, match=rf"cache.{key}={value!r}; allowed: {allowed}"):
            validate(compose(f"cache.{key}={value}", "logger=none"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ["sleb", "shortened_ppl", "blockpruner", "finercut"])
def test_a_candidate_subset_larger_than_the_calibration_set_is_refused_from_the_config(name, tmp_path):
    from depthbench.errors import ConfigError
    from depthbench.experiments.pipeline import validate

    with pytest.raises(ConfigError, match=rf"{name} score_samples=9: calibration.n_samples is 8; allowed: 0 \(all\) "
                                          r"or at most 8"):
        validate(compose(f"pruner={name}", "pruner.options.score_samples=9", "calibration.n_samples=8",
                          "logger=none"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_cpu_scale_declares_candidate_subsets_and_the_converged_training_budgets():
    """scale=cpu (make leaderboard-all): the default calibration; the per-candidate methods score on the subset their
    conf/budget/pruner/cpu_<name>.yaml declares; the trained methods get exactly scale=converged's budgets; others: the
    defaults."""
    for name in ("sleb", "shortened_ppl", "blockpruner", "finercut"):
        declared = OmegaConf.load(CONF / "budget" / "pruner" / f"cpu_{name}.yaml").pruner.options.score_samples
        cfg = compose(f"pruner={name}", "scale=cpu")
        assert cfg.pruner.options.score_samples == declared > 0 and cfg.calibration.n_samples == 128
    for name in ("llm_streamline", "replaceme_cosine"):
        converged = compose(f"pruner={name}", "scale=converged").pruner.options
        assert compose(f"pruner={name}", "scale=cpu").pruner.options == converged
    assert compose("pruner=uidl", "scale=cpu").pruner.options == compose("pruner=uidl").pruner.options


def test_a_path_override_names_one_cell_folder_not_a_nest():
    """A sweep cell's folder is its overrides with path separators replaced: ``calibration.path=/data/x.jsonl``
    does not nest the cell several folders below the sweep."""
    from omegaconf import open_dict

    cfg = compose("ratio=0.1", hydra_cfg=True)
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

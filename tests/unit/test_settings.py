"""Typed settings for every config group (depthbench/settings.py): Hydra refuses an unknown key or a mistyped value
of any group when it composes, and the typed tree composes to the values the untyped one did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from tests.composed_configs import ABSENT, all_cells, composing, flat, group_cells, resolved

BEFORE = Path(__file__).resolve().parents[1] / "data" / "composed_configs_before.json"

#: Keys the schemas add with the value the code used when they were absent (its former fallback, now removed):
#: (a predicate on the cell, flat key, value). Benchmark sampling: every config; Hub text: entries that lacked them.
ADDED = [(lambda cell: True, "benchmark.limit_sampling", "stratified"),
         (lambda cell: True, "benchmark.sample_seed", 0),
         # a new setting (calibration/strategy.py), not a former fallback: on a CPU `auto` chooses the store as before
         (lambda cell: True, "cache.activation_strategy", "auto"),
         # a new setting (calibration/memory_store.py): where a single run's store fits, it stays in memory
         (lambda cell: True, "cache.activations_memory_gb", "auto"),
         # a new option (Shortened-Taylor's accumulator, issue 29): auto keeps float64 sums on float32 models
         (lambda cell: "shortened_taylor" in cell, "pruner.options.accumulator", "auto"),
         # new settings (model.layerwise, issue 29), off by default; left out of the config hash while off
         (lambda cell: True, "model.layerwise", False),
         (lambda cell: True, "model.layerwise_buffer_gb", 1.0)]
for _key, _value in (("streaming", False), ("max_documents", 20000), ("chat", False)):
    ADDED += [(lambda cell: True, f"calibration.{_key}", _value),
              (lambda cell: True, f"evaluation.perplexity.{_key}", _value)]


#: Keys that are gone, with why: scale=paper's and scale=fast's budget tables became files of the one budget mechanism
#: (conf/budget/pruner/, conf/budget/healing/); the settings they fed (calibration.*, healing.*) are compared as before.
REMOVED_PREFIXES = ("paper_budget.", "healing_budget.")


def _strict(value) -> str:
    """Values compared as JSON, so that 16 and 16.0 differ (a config hash would)."""
    return json.dumps(value, sort_keys=True)


def _unexplained(cell: str, before: dict, after: dict) -> dict:
    """Where ``after`` differs from ``before``, less the documented additions."""
    a, b = flat(before), flat(after)
    out = {}
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, ABSENT), b.get(key, ABSENT)
        if _strict(old) == _strict(new):
            continue
        if old == ABSENT and any(pred(cell) and key == k and _strict(new) == _strict(v) for pred, k, v in ADDED):
            continue
        if new == ABSENT and key.startswith(REMOVED_PREFIXES):
            continue
        out[key] = (old, new)
    return out


def _before_config(dump: dict, cell: str) -> dict:
    """A cell's resolved config before the change, rebuilt from the base and the cell's flat difference."""
    values = flat(dump["base"])
    for key, value in dump["cells"][cell].items():
        if value == ABSENT:
            values.pop(key, None)
        else:
            values[key] = value
    return values


def _compare(cells: list[list[str]]) -> None:
    dump = json.loads(BEFORE.read_text())
    problems = {}
    with composing():
        base_after = resolved()
        for cell in cells:
            name = " ".join(cell)
            after = resolved(*cell)
            before = _before_config(dump, name)
            unexplained = _unexplained(name, before, flat(after))
            if unexplained:
                problems[name] = unexplained
        assert not _unexplained("", dump["base"], base_after)
    assert not problems, json.dumps(problems, indent=1, default=str)[:4000]


def test_every_group_entry_at_every_scale_composes_to_the_values_it_had():
    """Every group entry (pruner, healing, calibration, evaluation, benchmark, model, logger) at every scale: the
    same resolved values as the untyped tree (tests/data/composed_configs_before.json, written before the change),
    but for the documented `ADDED` keys."""
    scales = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "scale").glob("*.yaml"))
    _compare([[*cell, f"scale={scale}"] for cell in [[]] + group_cells() for scale in scales])


@pytest.mark.slow
def test_every_preset_cell_at_every_scale_composes_to_the_values_it_had():
    """As above for every cell of every preset's sweep (conf/experiment/*.yaml), at every scale."""
    _compare(all_cells())


def test_config_hashes_of_the_offline_configs_are_unchanged():
    """The hash that resume and the caches key on is the same as before the change for every config on the
    offline text (the Hub-text entries gained keys: their hash changes, see `ADDED`). Where the config held one of
    the budget tables that became files (`REMOVED_PREFIXES`: scale=fast's healing_budget, scale=paper's
    paper_budget) the hash is that of the config without the table: such a run from before reruns once."""
    from depthbench.experiments.resume import config_hash

    dump = json.loads(BEFORE.read_text())
    with composing():
        for cell in (["pruner=llm_streamline", "scale=cpu"], ["benchmark=offline_reasoning", "scale=default"],
                     ["healing=partial_layers", "scale=fast"], ["pruner=sleb", "scale=cpu"],
                     ["evaluation=local", "evaluation.path=/data/heldout.jsonl", "scale=default"]):
            name = " ".join(cell)
            before = {k: v for k, v in _before_config(dump, name).items() if not k.startswith(REMOVED_PREFIXES)}
            after = resolved(*cell)
            assert config_hash(after) == config_hash(_unflatten(before)), name


def _unflatten(values: dict) -> dict:
    out: dict = {}
    for key, value in values.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# (group choice, an unknown key, a mistyped override, the words the refusal must contain)
GROUPS = [
    ("calibration=reading_passages", "calibration.n_sample", "calibration.seq_len=long", "seq_len"),
    ("calibration=c4", "calibration.pathh", "calibration.streaming=maybe", "streaming"),
    ("calibration=local", "calibration.text_feld", "calibration.n_samples=1.5", "n_samples"),
    ("evaluation=default", "evaluation.fidelity.topk", "evaluation.fidelity.top_k=abc", "top_k"),
    ("evaluation=wikitext2", "evaluation.perplexity.max_window", "evaluation.perplexity.max_windows=all",
     "max_windows"),
    ("benchmark=offline", "benchmark.limt", "benchmark.batch_size=big", "batch_size"),
    ("model=smollm2_135m", "model.dtyp", "model.gguf=3", "gguf"),
    ("logger=wandb", "logger.projet", "logger.tags=5", "tags"),
    ("paths=default", "paths.cache", "paths.output_dir=[1]", "output_dir"),
    ("healing=lora", "healing.rnk", "healing.rank=eight", "rank"),
    ("healing=partial_layers", "healing.layer", "healing.layers=x", "layers"),
]


@pytest.mark.parametrize("choice,unknown,mistyped,key", GROUPS, ids=[g[0] for g in GROUPS])
def test_composition_refuses_an_unknown_key_or_a_wrong_type_in_every_group(choice, unknown, mistyped, key):
    extra = {"calibration=local": ["calibration.path=/x"]}.get(choice, [])
    resolved(choice, *extra)  # the entry itself composes
    with pytest.raises(ConfigCompositionException, match=unknown.split(".")[-1]):
        resolved(choice, *extra, f"{unknown}=1")
    with pytest.raises(ConfigCompositionException, match=key):
        resolved(choice, *extra, mistyped)


def test_an_unknown_key_in_a_yaml_entry_is_refused(tmp_path):
    """A typo in a YAML file (not only on the command line) stops composition naming the key: the schema is the
    base of the entry, so merging the entry onto it refuses the key."""
    import shutil

    from hydra import compose, initialize_config_dir

    from depthbench.config_store import register_configs

    conf = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[2] / "conf", conf)
    (conf / "evaluation" / "typo.yaml").write_text(
        "defaults:\n  - /schema/evaluation/hash_split@_here_\n  - _self_\nperplexity:\n  source: reading_passages\n"
        "  max_windos: 3\n")
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="max_windos"):
            compose(config_name="config", overrides=["evaluation=typo"])


def test_code_reads_the_schema_defaults_not_fallbacks_of_its_own():
    """A Python caller's benchmark dict is completed with `BenchmarkSettings`' defaults (the only ones)."""
    from depthbench.evaluation.lm_eval_runner import benchmark_values

    values = benchmark_values({"name": "x", "tasks": ["piqa"]})
    assert values["limit_sampling"] == "stratified" and values["sample_seed"] == 0 and values["batch_size"] == 8
    from depthbench.errors import ConfigError

    with pytest.raises(ConfigError, match="description"):
        benchmark_values({"name": "x", "tasks": ["piqa"], "description": "d"})


def test_an_appended_key_no_setting_declares_is_refused_and_every_group_entry_passes():
    """``+evaluation.bogus=1`` reaches the config past Hydra's typed check (an append); the run's check names it and
    the allowed keys, at any depth and at the run level. Every group entry as shipped passes."""
    from depthbench.errors import ConfigError
    from depthbench.settings import check_declared_keys
    from tests.helpers import compose

    for override, message in (("+evaluation.bogus=1", "evaluation.bogus: evaluation has no setting 'bogus'; "
                                                       "allowed keys of evaluation: perplexity, fidelity"),
                              ("+evaluation.perplexity.zz=2", "evaluation.perplexity has no setting 'zz'"),
                              ("+foo=3", "foo: the run has no setting 'foo'; allowed keys of the run: ratio, seed"),
                              ("+healing.q=1", "healing.q: healing has no setting 'q'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            check_declared_keys(compose(override))
    for cell in [[]] + group_cells():
        check_declared_keys(compose(*cell))

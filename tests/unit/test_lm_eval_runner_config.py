"""Benchmark configs are validated before any model is loaded: one clear line per mistake."""


import pytest

from depthbench.errors import ConfigError
from depthbench.evaluation.lm_eval_runner import parse_benchmark
from tests.offline_packages import bigbench_installed
from tests.helpers import CONF


def _benchmark(preset: str) -> dict:
    """The preset as a run sees it: composed on its schema (the keys the YAML leaves at their defaults)."""
    from tests.composed_configs import resolved

    return resolved(f"benchmark={preset}")["benchmark"]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml") if p.stem != "none"))
def test_every_preset_parses(preset):
    cfg = _benchmark(preset)
    if preset == "bigbench" and not bigbench_installed():  # optional: one clear error before any model
        with pytest.raises(ConfigError, match=r"benchmark=bigbench .*needs the package `bigbench`"):
            parse_benchmark(cfg)
        return
    specs = parse_benchmark(cfg)
    assert [s.name for s in specs] == [t["name"] for t in cfg["tasks"]]
    assert cfg["name"] == preset


def test_replaceme_preset_matches_the_paper():
    cfg = _benchmark("replaceme_paper")
    shots = {s.name: s.num_fewshot for s in parse_benchmark(cfg)}
    assert shots == {"winogrande": 5, "boolq": 0, "race": 0, "openbookqa": 0, "piqa": 0, "sciq": 0,
                     "lambada_openai": 0}


def test_per_task_overrides_and_defaults():
    specs = parse_benchmark({"name": "x", "limit": 10, "batch_size": 4,
                             "tasks": ["piqa", {"name": "boolq", "limit": 0.5, "batch_size": 2, "num_fewshot": 3}]})
    assert (specs[0].limit, specs[0].batch_size, specs[0].num_fewshot, specs[0].metric) == (10, 4, 0, "acc")
    assert (specs[1].limit, specs[1].batch_size, specs[1].num_fewshot) == (0.5, 2, 3)


@pytest.mark.parametrize("cfg, message", [
    ({"name": "x", "tasks": []}, "lists no tasks"),
    ({"name": "x", "tasks": ["a"], "limits": 3}, "unknown key.*limits"),
    ({"name": "x", "tasks": ["a"], "limit": 0}, "limit=0 is not allowed"),
    ({"name": "x", "tasks": ["a"], "batch_size": 0}, "batch_size=0"),
    ({"name": "x", "tasks": [{"name": "a", "num_fewshot": -1}]}, "num_fewshot=-1"),
    ({"name": "x", "tasks": [{"name": "a", "shots": 1}]}, "allowed keys"),
    ({"name": "x", "tasks": ["a", "a"]}, "twice"),
    ({"name": "x", "offline": True, "tasks": ["race"]}, "'race' has no offline copy; offline tasks: arc_easy@val"),
    ({"name": "x", "offline": True, "tasks": ["arc_easy"]}, "'arc_easy' has no offline copy"),
    ({"name": "x", "offline": True, "tasks": ["bigbench_emoji_movie"]}, "not a BIG-bench multiple-choice task"),
    ({"name": "x", "offline": True, "tasks": [{"name": "piqa", "num_fewshot": 5}]},
     "'piqa': num_fewshot=5 is not available offline.*training split"),
])
def test_bad_configs_fail_with_one_line(cfg, message):
    with pytest.raises(ConfigError, match=message):
        parse_benchmark(cfg)


def test_group_samples_concatenate_leaves_and_average_to_the_size_weighted_score():
    """task_samples on lm-eval's output layout for a group (mmlu -> subgroups -> subjects)."""
    from depthbench.evaluation.lm_eval_runner import task_samples

    logs = {"sub_a": [{"doc_id": 1, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}],
            "sub_b": [{"doc_id": 0, "acc": 1.0}, {"doc_id": 1, "acc": 1.0}, {"doc_id": 2, "acc": 0.0}]}
    out = {"samples": logs, "group_subtasks": {"g": ["g_stem"], "g_stem": ["sub_a", "sub_b"]}}
    samples = task_samples(out, "g", "acc")
    assert samples == {"doc_id": [0, 1, 0, 1, 2], "correct": [0, 1, 1, 1, 0],
                       "subtask": ["sub_a", "sub_a", "sub_b", "sub_b", "sub_b"]}
    weighted = (2 * 0.5 + 3 * (2 / 3)) / 5  # lm-eval's weight_by_size aggregation of the two subjects
    assert sum(samples["correct"]) / 5 == weighted
    assert task_samples({"samples": {"t": [{"doc_id": 0, "perplexity": 3.2}]}}, "t", "perplexity") is None


def test_lm_eval_git_probe_is_silent_outside_a_checkout(tmp_path, monkeypatch, capfd):
    """lm-eval's own probe prints git's "fatal: not a git repository"; ours returns None quietly."""
    import lm_eval.evaluator

    from depthbench.evaluation.lm_eval_runner import _git_hash_quietly, _lean_lm_eval_metadata

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert _git_hash_quietly() is None
    with _lean_lm_eval_metadata():
        assert lm_eval.evaluator.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err

"""Benchmark configs are validated before any model is loaded: one clear line per mistake."""

from pathlib import Path

import pytest
import yaml

from depthbench.errors import ConfigError
from depthbench.evaluation.lm_eval_runner import parse_benchmark

CONF = Path(__file__).resolve().parents[2] / "conf" / "benchmark"


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "none"))
def test_every_preset_parses(preset):
    cfg = yaml.safe_load((CONF / f"{preset}.yaml").read_text())
    specs = parse_benchmark(cfg)
    assert [s.name for s in specs] == [t["name"] for t in cfg["tasks"]]
    assert cfg["name"] == preset


def test_replaceme_preset_matches_the_paper():
    cfg = yaml.safe_load((CONF / "replaceme_paper.yaml").read_text())
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
    ({"name": "x", "offline": True, "tasks": ["hellaswag"]}, "not a BIG-bench multiple-choice task"),
])
def test_bad_configs_fail_with_one_line(cfg, message):
    with pytest.raises(ConfigError, match=message):
        parse_benchmark(cfg)

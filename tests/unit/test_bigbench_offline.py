"""The rows converted from the bigbench package match the package's JSON, for every offline task.

Independent references: the package's JSON read here directly (count, choices, gold answer, scored
by lm-eval's own ``doc_to_choice``/``doc_to_target``), and the package's own ``default_format_fn``
(taken from the installed ``bigbench/api/json_task.py`` by its syntax tree, since importing that
module needs TensorFlow) for the text of ``inputs``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from depthbench.errors import ConfigError

from tests.offline_packages import needs_bigbench
from tests.helpers import REPO

pytestmark = needs_bigbench

OFFLINE = yaml.safe_load((REPO / "conf" / "benchmark" / "bigbench.yaml").read_text())  # the BIG-bench preset
TASKS = [t["name"] if isinstance(t, dict) else t for t in OFFLINE["tasks"]]
BB_ROOT = Path(importlib.util.find_spec("bigbench").origin).parent if importlib.util.find_spec("bigbench") else None


def _package_parts(lm_eval_name: str) -> list[dict]:
    """The task's JSON, or its subtasks' JSON in the order of task_metadata.json's subtask_names."""
    task = lm_eval_name[len("bigbench_"):-len("_multiple_choice")]
    data = json.loads((BB_ROOT / "benchmark_tasks" / task / "task.json").read_text(encoding="utf-8"))
    if "examples" in data:
        return [data]
    metadata = json.loads((BB_ROOT / "benchmark_tasks" / "task_metadata.json").read_text(encoding="utf-8"))
    names = metadata[task]["subtask_names"]
    subs = [json.loads(p.read_text(encoding="utf-8")) for p in (BB_ROOT / "benchmark_tasks" / task).glob("*/task.json")]
    by_name = {sub["name"]: sub for sub in subs}
    assert len(by_name) == len(subs) == len(names)
    return [by_name[n.split(":")[-1]] for n in names]


def _distinct(examples):
    seen, out = set(), []
    for ex in examples:
        key = (ex["input"], tuple(ex["target_scores"].items()), json.dumps(ex.get("target")), tuple(sorted(ex)))
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _bigbench_default_format_fn():
    """``default_format_fn`` from the installed bigbench package, compiled without its module's imports."""
    source = (BB_ROOT / "api" / "json_task.py").read_text()
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "default_format_fn")
    namespace = {"np": np, **{k: getattr(typing, k) for k in ("Dict", "Any", "List", "Optional", "Union")}}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "json_task.py", "exec"), namespace)
    return namespace["default_format_fn"]


def test_offline_tasks_are_between_6_and_10():
    assert 6 <= len(TASKS) <= 10
    assert OFFLINE["offline"] is True


@pytest.mark.parametrize("name", TASKS)
def test_converted_rows_match_package_json(name, task_manager, tmp_path):
    from depthbench.evaluation.lm_eval_runner import offline_task_config

    pairs = [(data, ex) for data in _package_parts(name) for ex in _distinct(data["examples"])]
    cfg = offline_task_config(name, tmp_path, task_manager)
    task = task_manager.load([cfg])["tasks"][name]
    docs = list(task.test_docs())

    assert len(docs) == len(pairs)  # count
    format_fn = _bigbench_default_format_fn()
    for doc, (data, ex) in zip(docs, pairs):
        keys = [k.strip() for k in ex["target_scores"]]
        choices = task.doc_to_choice(doc)
        assert choices == keys  # choices, in the JSON's order
        best = max(ex["target_scores"].values())
        gold = [k.strip() for k, v in ex["target_scores"].items() if v == best][0]
        assert choices[task.doc_to_target(doc)] == gold  # gold answer as lm-eval scores it
        formatted = format_fn(
            json.loads(json.dumps(ex)),
            input_prefix=data.get("example_input_prefix", "\nQ: "),
            output_prefix=data.get("example_output_prefix", "\nA: "),
            choice_prefix=data.get("choice_prefix", "\n  choice: "),
            random_seed=42,
            append_choices_to_input=data.get("append_choices_to_input", True),
        )
        assert doc["inputs"] == (data.get("task_prefix", "") + formatted["input"]).strip()
        assert task.doc_to_text(doc) == doc["inputs"]
    assert task.VERSION == 1.0  # lm-eval's own task definition (its YAML's metadata.version)
    assert cfg["metadata"]["replaces_dataset"].startswith("hails/bigbench/")


def test_every_choice_appears_in_the_prompt_and_duplicates_are_dropped():
    from depthbench.evaluation.bigbench_offline import format_example

    data = {"examples": []}
    ex = {"input": "Pick one.", "target_scores": {"d": 0, "a": 1, "c": 0, "e": 0, "b": 0}}
    row = format_example(json.loads(json.dumps(ex)), data, 3)
    # sorted choices a..e permuted by numpy.random.RandomState(42): b, e, c, a, d (written out by hand)
    assert row["inputs"] == "Q: Pick one.\n  choice: b\n  choice: e\n  choice: c\n  choice: a\n  choice: d\nA:"
    assert row["targets"] == ["a"] and row["multiple_choice_targets"] == ["d", "a", "c", "e", "b"]
    assert row["multiple_choice_scores"] == [0, 1, 0, 0, 0] and row["idx"] == 3

    from depthbench.evaluation.bigbench_offline import distinct_examples

    assert distinct_examples([ex, dict(ex), {"input": "x", "target_scores": {"y": 1}}]) == [
        ex, {"input": "x", "target_scores": {"y": 1}}]


def test_unsupported_and_unknown_tasks_fail_with_one_line():
    from depthbench.evaluation.bigbench_offline import bigbench_task_name, convert_task

    with pytest.raises(ConfigError, match="kanji_ascii:.*no target_scores"):
        convert_task("kanji_ascii")  # a subtask with examples that are not multiple choice
    with pytest.raises(ConfigError, match="unknown BIG-bench task 'no_such_task'.*emoji_movie"):
        convert_task("no_such_task")
    with pytest.raises(ConfigError, match="not a BIG-bench multiple-choice task"):
        bigbench_task_name("hellaswag")


def test_subtasks_are_concatenated_in_metadata_order():
    """A task made of subtasks: its subtasks' rows one after the other, in task_metadata.json's order."""
    from depthbench.evaluation.bigbench_offline import chance_level, convert_task, format_example

    parts = _package_parts("bigbench_cause_and_effect_multiple_choice")
    # the order in bigbench/benchmark_tasks/task_metadata.json, written out by hand
    assert [p["name"] for p in parts] == ["one_sentence", "one_sentence_no_prompt", "two_sentences"]
    rows = convert_task("cause_and_effect")
    sizes = [len(_distinct(p["examples"])) for p in parts]
    assert len(rows) == sum(sizes)
    start = 0
    for part, size in zip(parts, sizes):
        assert rows[start]["idx"] == 0 and rows[start + size - 1]["idx"] == size - 1  # numbered per subtask
        assert rows[start] == format_example(json.loads(json.dumps(part["examples"][0])), part, 0)
        start += size
    assert chance_level("cause_and_effect") == pytest.approx(0.5)

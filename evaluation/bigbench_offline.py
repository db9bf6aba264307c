"""BIG-bench multiple-choice tasks served offline, in the exact rows of the Hub dataset lm-eval reads.

lm-eval's ``bigbench_<task>_multiple_choice`` tasks read ``hails/bigbench`` (config
``<task>_zero_shot``, split ``default``). That dataset was pushed from the Hugging Face ``bigbench``
dataset script, which formats each example with the ``bigbench`` package's own code:

- ``JsonTask`` drops duplicate examples (same JSON), keeping the first, and formats each one with
  ``default_format_fn``: when ``append_choices_to_input`` (default true) the choices, sorted and then
  permuted by ``numpy.random.RandomState(42)`` (a fresh generator per example), are appended to the
  input after ``choice_prefix`` (default ``"\\n  choice: "``); the input is then wrapped as
  ``example_input_prefix + input + example_output_prefix`` (defaults ``"\\nQ: "`` and ``"\\nA: "``).
  When an example has no ``target``, the first choice with the highest score is the target.
- the bridge (``bigbench_bridge``, type HUGGINGFACE, split ``all``: no shuffle, no sampling) prepends
  the task's ``task_prefix``; the dataset script strips every string and stores the scores as int32.

This module repeats those steps on the package's JSON (nothing is downloaded) and writes one JSON
Lines file per task, which lm-eval's own task definition then reads through the ``json`` builder.

A task made of subtasks is, in the Hub dataset, the concatenation of its subtasks in the order of
``subtask_names`` in the package's ``benchmark_tasks/task_metadata.json`` (the order the dataset
script iterates), each subtask's rows formatted as above with that subtask's own JSON fields
(prefixes, ``task_prefix``) and numbered from 0 (``idx``). Its first rows therefore all come from
the first subtask.

Known uncertainty: ``hails/bigbench`` was built from the ``bigbench`` 0.0.1 tarball, not from the
PyPI release 1.0.0 installed here; a task whose JSON changed between the two would differ. Only
tasks whose every example is multiple choice with integer scores are supported (for subtask
mixtures the order of the subtasks adds room for divergence).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from depthbench import atomic
from depthbench.errors import ConfigError
from depthbench.packaged_files import packaged_file

# Bump when the conversion changes: it is part of the data file name and of every cache key.
CONVERTER_VERSION = 1
FORMAT_SEED = 42  # JsonTask's default random_seed, passed to default_format_fn for every example
LM_EVAL_TASK_PREFIX = "bigbench_"
LM_EVAL_TASK_SUFFIX = "_multiple_choice"


def benchmark_tasks_dir() -> Path:
    return packaged_file("bigbench", "benchmark_tasks", "benchmark=bigbench (BIG-bench tasks)",
                         instead="the default benchmark=offline needs no BIG-bench")


def bigbench_version() -> str | None:
    try:
        return version("bigbench")
    except PackageNotFoundError:
        return None


def data_version() -> str:
    """Identifies the converted data: the package release and the converter revision."""
    return f"bigbench-{bigbench_version()}+converter-{CONVERTER_VERSION}"


def lm_eval_task_name(task: str) -> str:
    return f"{LM_EVAL_TASK_PREFIX}{task}{LM_EVAL_TASK_SUFFIX}"


def bigbench_task_name(lm_eval_name: str) -> str:
    """``bigbench_emoji_movie_multiple_choice`` -> ``emoji_movie``."""
    if not (lm_eval_name.startswith(LM_EVAL_TASK_PREFIX) and lm_eval_name.endswith(LM_EVAL_TASK_SUFFIX)):
        raise ConfigError(
            f"task {lm_eval_name!r} is not a BIG-bench multiple-choice task; offline tasks are named "
            f"{LM_EVAL_TASK_PREFIX}<task>{LM_EVAL_TASK_SUFFIX}"
        )
    return lm_eval_name[len(LM_EVAL_TASK_PREFIX):-len(LM_EVAL_TASK_SUFFIX)]


def load_task_json(task: str) -> dict:
    root = benchmark_tasks_dir()
    path = root / task / "task.json"
    if not path.is_file():
        available = sorted(p.parent.name for p in root.glob("*/task.json"))
        raise ConfigError(f"unknown BIG-bench task {task!r}; JSON tasks in the package: {', '.join(available)}")
    return json.loads(path.read_text(encoding="utf-8"))


def distinct_examples(examples: list[dict]) -> list[dict]:
    """First occurrence of each example, compared as JSON text (as ``JsonTask`` does)."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        key = json.dumps(ex)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def subtask_jsons(task: str) -> list[dict]:
    """The subtasks' JSON, in the order of ``subtask_names`` in ``task_metadata.json``; [] without subtasks.

    Matched by each subtask JSON's ``name`` field, as the ``bigbench`` bridge matches them.
    """
    root = benchmark_tasks_dir()
    metadata = json.loads((root / "task_metadata.json").read_text(encoding="utf-8"))
    names = metadata.get(task, {}).get("subtask_names") or []
    if not names:
        return []
    by_name = {}
    for path in sorted((root / task).glob("*/task.json")):
        sub = json.loads(path.read_text(encoding="utf-8"))
        by_name[str(sub.get("name", "")).encode("ascii", errors="replace").decode()] = sub
    missing = [n for n in names if n.split(":")[-1] not in by_name]
    if missing:
        raise ConfigError(f"BIG-bench task {task!r}: subtasks {missing} of task_metadata.json have no task.json")
    return [by_name[n.split(":")[-1]] for n in names]


def _parts(task: str) -> list[tuple[str, dict]]:
    """(label, JSON) whose examples make up the task's rows, in order: the task, or its subtasks."""
    data = load_task_json(task)
    if "examples" in data:
        return [(task, data)]
    subs = subtask_jsons(task)
    if not subs:
        raise ConfigError(f"BIG-bench task {task!r} has neither examples nor subtasks")
    return [(f"{task}:{sub['name']}", sub) for sub in subs]


def _check_supported(task: str, data: dict) -> None:
    if "examples" not in data:
        raise ConfigError(f"BIG-bench task {task!r} is made of nested subtasks, which are not supported")
    for i, ex in enumerate(data["examples"]):
        scores = ex.get("target_scores")
        if not scores:
            raise ConfigError(f"BIG-bench task {task!r}: example {i} has no target_scores (not multiple choice)")
        if any(float(v) != int(v) for v in scores.values()):
            raise ConfigError(f"BIG-bench task {task!r}: example {i} has non-integer scores, "
                              "which the Hub dataset truncates")


def format_example(ex: dict, data: dict, row: int) -> dict:
    """One row of the Hub dataset ``hails/bigbench`` (``<task>_zero_shot``, split ``default``)."""
    scores: dict = ex["target_scores"]
    text = ex["input"]
    if data.get("append_choices_to_input", True):
        choice_prefix = data.get("choice_prefix", "\n  choice: ")
        permuted = np.random.RandomState(seed=FORMAT_SEED).permutation(sorted(scores))
        text = text + choice_prefix + choice_prefix.join(str(c) for c in permuted)
    text = data.get("example_input_prefix", "\nQ: ") + text + data.get("example_output_prefix", "\nA: ")
    target = ex.get("target")
    if target is None:
        best = max(scores.values())
        target = next(k for k, v in scores.items() if v == best)
    targets = target if isinstance(target, list) else [target]
    return {
        "idx": row,
        "inputs": (str(data.get("task_prefix", "")) + text).strip(),
        "targets": [str(t).strip() for t in targets],
        "multiple_choice_targets": [str(k).strip() for k in scores],
        "multiple_choice_scores": [int(v) for v in scores.values()],
    }


def convert_task(task: str) -> list[dict]:
    """All rows of the task, in the package's order, as the Hub dataset holds them."""
    rows = []
    for label, data in _parts(task):
        _check_supported(label, data)
        rows += [format_example(ex, data, row) for row, ex in enumerate(distinct_examples(data["examples"]))]
    return rows


def task_data_file(task: str, cache_dir: str | Path) -> Path:
    """The task's converted rows as JSON Lines under ``cache_dir``, written once (atomically)."""
    path = Path(cache_dir) / "bigbench_offline" / data_version() / f"{task}.jsonl"
    if path.is_file():
        return path
    rows = convert_task(task)
    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def chance_level(task: str) -> float:
    """Expected accuracy of a uniform random guess: the mean of 1 / (number of choices)."""
    examples = [ex for _, data in _parts(task) for ex in distinct_examples(data["examples"])]
    return float(np.mean([1.0 / len(ex["target_scores"]) for ex in examples]))

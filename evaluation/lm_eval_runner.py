"""Run a benchmark (a ``conf/benchmark`` entry) with lm-eval on a model held in memory.

The model object is wrapped in lm-eval's own HF model class (``HFLM(pretrained=<model>)``), so a
pruned model is evaluated exactly as lm-eval would evaluate it from disk, without a save and reload.

Task definitions are always lm-eval's own. For ``offline: true`` benchmarks (BIG-bench
multiple-choice tasks) the task's YAML is loaded unchanged except for where the data comes from:
``dataset_path`` points at the ``json`` builder and the rows converted from the ``bigbench`` package
(see `depthbench.evaluation.bigbench_offline`), so nothing is downloaded and the scores stay comparable with
lm-eval's ``bigbench_*_multiple_choice`` tasks run online.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from depthbench.errors import ConfigError
from depthbench.evaluation import bigbench_offline

log = logging.getLogger(__name__)

BENCHMARK_KEYS = ("name", "offline", "tasks", "limit", "batch_size", "description")
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
    cfg = _plain(benchmark_cfg)
    unknown = sorted(set(cfg) - set(BENCHMARK_KEYS))
    if unknown:
        raise ConfigError(f"benchmark: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(BENCHMARK_KEYS)}")
    tasks = cfg.get("tasks") or []
    if not tasks:
        raise ConfigError(f"benchmark {cfg.get('name')!r} lists no tasks")
    limit = _check_limit(cfg.get("limit"), "benchmark.limit")
    batch_size = _check_batch_size(cfg.get("batch_size", 8), "benchmark.batch_size")
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
            bigbench_offline.bigbench_task_name(s.name)
    return specs


def check_tasks(benchmark_cfg, task_manager=None) -> None:
    """Cheap check before any model is loaded: every task is one lm-eval knows (lists close matches)."""
    specs = parse_benchmark(benchmark_cfg)
    tm = task_manager or _task_manager()
    for s in specs:
        if s.name not in tm.task_index:
            raise ConfigError(f"unknown lm-eval task {s.name!r}; {_suggest(s.name, tm.all_tasks)}")
    if _plain(benchmark_cfg).get("offline"):
        for s in specs:
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


def evaluate_benchmark(model, tokenizer, benchmark_cfg, cache_dir: str | Path, progress: bool = True) -> dict:
    """Evaluate ``model`` (in memory) on every task of ``benchmark_cfg``; one lm-eval run per task.

    Returns per-task headline metric (``value``, ``stderr``), every numeric lm-eval metric, the task
    version, few-shot count, examples evaluated, and the lm-eval version; ``average`` is the mean of
    the headline metrics.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs = parse_benchmark(benchmark_cfg)
    cfg = _plain(benchmark_cfg)
    offline = bool(cfg.get("offline"))
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
            task = offline_task_config(spec.name, cache_dir, tm) if offline else spec.name
            out = lm_eval.simple_evaluate(
                model=lms[spec.batch_size], tasks=[task], num_fewshot=spec.num_fewshot, limit=spec.limit,
                task_manager=tm, bootstrap_iters=1000, log_samples=False,
            )
            tasks[spec.name] = _task_result(out, spec)
            if offline:
                bb = bigbench_offline.bigbench_task_name(spec.name)
                tasks[spec.name]["chance"] = bigbench_offline.chance_level(bb)
    finally:
        model.train(was_training)
    values = [t["value"] for t in tasks.values()]
    return {
        "benchmark": cfg.get("name"),
        "offline": offline,
        "data": bigbench_offline.data_version() if offline else "hub",
        "lm_eval_version": lm_eval_version(),
        "limit": cfg.get("limit"),
        "tasks": tasks,
        "average": sum(values) / len(values),
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
    n = out.get("n-samples", {}).get(spec.name, {})
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
    }

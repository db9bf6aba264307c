"""The offline standard suite on the embedded SmolLM2: cost per task and dense scores.

Two parts, both written to ``docs/offline_suite.json`` (``--output``):

- ``plan`` (no model forward, seconds): for every offline standard task and for the BIG-bench preset,
  the tokens lm-eval scores per example (context + continuation of each request, as lm-eval builds
  them, tokenized with SmolLM2's tokenizer) on the first ``--plan-examples`` documents. The default
  suite's cost per model is read from it (docs/BENCHMARKS.md).
- ``scores`` (``--scores``): the dense SmolLM2-135M-Instruct (model.dtype=auto) evaluated on the tasks given
  (default: the suite in conf/benchmark/offline.yaml) at ``--limit`` through `evaluate_benchmark`,
  with value, standard error, examples, wall and CPU seconds per task.

    .venv/bin/python benchmarks/offline_suite.py                    # plan only
    .venv/bin/python benchmarks/offline_suite.py --scores --limit 50 --threads 2
    .venv/bin/python benchmarks/offline_suite.py --report-only      # the Markdown table of docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from depthbench import atomic
from depthbench.evaluation import standard_offline

REPO = Path(__file__).resolve().parents[1]


# The model card of HuggingFaceTB/SmolLM2-135M-Instruct ("Instruction model" table; lighteval, zero-shot,
# its own prompts; ARC is the average of ARC-Easy and ARC-Challenge on test; MMLU in cloze form, not
# lm-eval's letter-answer form). Same task and shots, not the same prompts: a sanity check only.
MODEL_CARD = {"hellaswag": ("HellaSwag", 40.9), "piqa": ("PIQA", 66.3),
              "arc_easy@validation": ("ARC (Average)", 37.3), "arc_challenge@validation": ("ARC (Average)", 37.3),
              "mmlu": ("MMLU (cloze)", 29.3)}


def report(record: dict) -> str:
    """Markdown table of the dense scores in ``record`` next to the model card's numbers."""
    lines = ["| task | metric | limit | examples | dense acc +- stderr | model card (lighteval) | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for run, rows in (record.get("scores") or {}).items():
        for name, r in rows.items():
            card = MODEL_CARD.get(name)
            lines.append(f"| {name} | {r['metric']} | {run.split('=')[1]} | {r['n_samples']} | "
                         f"{r['value']:.3f} +- {r['stderr']:.3f} | {f'{card[0]} {card[1]}' if card else '-'} | "
                         f"{r['wall_seconds']} | {r['cpu_seconds']} |")
    return "\n".join(lines)


def _bench(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "benchmark" / f"{name}.yaml"), resolve=True)


def _task_objects(name: str, cache_dir: Path) -> list:
    """lm-eval's leaf Task objects for an offline task (a group gives several)."""
    from lm_eval.api.group import Group

    from depthbench.evaluation.lm_eval_runner import _task_manager, offline_task

    tm = _task_manager()
    obj = offline_task(name, cache_dir, tm)
    if isinstance(obj, dict):
        obj = tm.load([obj])["tasks"][obj["task"]]
    return obj.get_all_tasks() if isinstance(obj, Group) else [obj]


def tokens_per_example(name: str, tokenizer, n: int, cache_dir: Path) -> dict:
    """Mean tokens lm-eval scores per example (all requests of the example) on the first ``n`` docs."""
    total, docs = 0, 0
    for task in _task_objects(name, cache_dir):
        task.build_all_requests(limit=n, rank=0, world_size=1)
        per_doc: dict[int, int] = {}
        for inst in task.instances:
            context, continuation = inst.arguments[:2]
            per_doc[inst.doc_id] = per_doc.get(inst.doc_id, 0) + len(
                tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
        total += sum(per_doc.values())
        docs += len(per_doc)
    return {"examples": docs, "tokens_per_example": total / docs}


def plan(tokenizer, n: int, cache_dir: Path) -> dict:
    rows = {}
    for name in standard_offline.LOCAL_TASKS:
        rows[name] = tokens_per_example(name, tokenizer, n, cache_dir)
        print(name, rows[name], flush=True)
    offline = _bench("offline")
    suite_tokens = sum(rows[t["name"]]["tokens_per_example"] * offline["limit"] for t in offline["tasks"])
    out = {"plan_examples": n, "standard": rows, "offline_suite_tokens_per_model": suite_tokens,
           "offline_suite_limit": offline["limit"]}
    if importlib.util.find_spec("bigbench") is None:  # optional (docs/USAGE.md, "BIG-bench (optional)"): no comparison
        print("bigbench is not installed: the plan leaves out the BIG-bench preset's cost", flush=True)
        return out
    bigbench = _bench("bigbench")
    bb_rows = {t["name"]: tokens_per_example(t["name"], tokenizer, bigbench["limit"], cache_dir)
               for t in bigbench["tasks"]}
    bb_tokens = sum(r["tokens_per_example"] * r["examples"] for r in bb_rows.values())
    return {**out, "bigbench_preset": bb_rows, "bigbench_preset_tokens_per_model": bb_tokens,
            "ratio_to_bigbench": suite_tokens / bb_tokens}


def scores(loaded, tasks: list[dict], limit, cache_dir: Path, save) -> dict:
    """Each task's dense result, saved (``save(out)``) after every task so an interrupted run keeps them."""
    from depthbench.evaluation.lm_eval_runner import evaluate_benchmark

    out = {}
    for task in tasks:
        bench = {"name": "dense", "offline": True, "limit": limit, "batch_size": 16, "tasks": [task]}
        wall, cpu = time.perf_counter(), time.process_time()
        row = evaluate_benchmark(loaded.model, loaded.tokenizer, bench, cache_dir, progress=True)["tasks"][task["name"]]
        row = {k: v for k, v in row.items() if k != "samples"}
        row.update(wall_seconds=round(time.perf_counter() - wall, 1), cpu_seconds=round(time.process_time() - cpu, 1))
        out[task["name"]] = row
        save(out)
        print(task["name"], row, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "offline_suite.json")
    parser.add_argument("--plan-examples", type=int, default=100)
    parser.add_argument("--scores", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--skip-plan", action="store_true", help="keep the plan already in --output")
    parser.add_argument("--report-only", action="store_true", help="print the scores table from --output")
    parser.add_argument("--tasks", default=None, help="comma-separated offline tasks (default: offline.yaml's)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: offline.yaml's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.report_only:
        print(report(json.loads(args.output.read_text())))
        return

    import torch

    from hydra import compose, initialize_config_dir

    from depthbench.config_store import register_configs
    from depthbench.modeling.loading import default_cache_dir, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["progress=false"])
    cache_dir = args.cache_dir or default_cache_dir()
    record = json.loads(args.output.read_text()) if args.output.is_file() else {}
    loaded = load_model(cfg.model, device="cpu")
    record["environment"] = {"model": "smollm2-135m-instruct", "dtype": str(loaded.model.dtype),
                             "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                             "date": time.strftime("%Y-%m-%d"), "offline_data": standard_offline.data_version()}
    if not (args.skip_plan and "plan" in record):
        record["plan"] = plan(loaded.tokenizer, args.plan_examples, cache_dir)
        atomic.write_json(args.output, record)
    if args.scores:
        offline = _bench("offline")
        tasks = [{"name": n} for n in args.tasks.split(",")] if args.tasks else offline["tasks"]
        limit = args.limit if args.limit is not None else offline["limit"]
        runs = record.setdefault("scores", {})

        def save(rows: dict) -> None:
            runs[f"limit={limit}"] = {**runs.get(f"limit={limit}", {}), **rows}
            atomic.write_json(args.output, record)

        scores(loaded, tasks, limit, cache_dir, save)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""Choose the offline benchmark: BIG-bench MC tasks on which SmolLM2-135M scores clearly above chance.

Runs lm-eval's own ``bigbench_<task>_multiple_choice`` definitions on data converted from the
``bigbench`` package (see `evaluation.bigbench_offline`), with the embedded SmolLM2 in the project's
default dtype, and writes ``docs/BENCHMARKS.md``: every candidate with its score, standard error,
examples evaluated and chance level, and which were chosen. A task is chosen when its accuracy
exceeds chance by at least ``--min-z`` standard errors and ``--min-margin`` absolute.

Results are appended to a JSON file task by task, so an interrupted run resumes; ``--report-only``
rewrites the Markdown from that file without evaluating anything.

    .venv/bin/python benchmarks/choose_offline_tasks.py --limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from depthbench import atomic  # noqa: E402
from evaluation import bigbench_offline  # noqa: E402

# English tasks without subtasks, integer scores and one correct choice, short enough for a CPU.
CANDIDATES = [
    "emoji_movie", "code_line_description", "physical_intuition", "similarities_abstraction",
    "phrase_relatedness", "intent_recognition", "odd_one_out", "riddle_sense", "human_organs_senses",
    "movie_recommendation", "social_iqa", "misconceptions", "entailed_polarity", "empirical_judgments",
    "anachronisms", "known_unknowns", "date_understanding", "simple_ethical_questions",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100, help="examples per task (the first N, lm-eval's --limit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tasks", nargs="*", default=CANDIDATES, help="BIG-bench task names to measure")
    p.add_argument("--min-z", type=float, default=2.0, help="chosen: (acc - chance) / stderr at least this")
    p.add_argument("--min-margin", type=float, default=0.05, help="chosen: acc - chance at least this")
    p.add_argument("--max-chosen", type=int, default=10)
    p.add_argument("--results", type=Path, default=REPO / "docs" / "offline_task_scores.json")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    p.add_argument("--final-run", default=None, help="run key the suite is chosen from (default: the last)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the Markdown from --results")
    args = p.parse_args(argv)

    store = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": {}}
    if not args.report_only:
        measure(args, store)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.output, report(store, args))
    print(f"wrote {args.output}")
    return 0


def _run_key(args) -> str:
    return f"limit={args.limit},batch_size={args.batch_size},dtype={args.dtype}"


def measure(args, store: dict) -> None:
    from hydra import compose, initialize_config_dir

    from evaluation.lm_eval_runner import evaluate_benchmark
    from modeling.loading import default_cache_dir, load_model

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model.dtype={args.dtype}"])
    cache_dir = args.cache_dir or default_cache_dir()
    key = _run_key(args)
    run = store["runs"].setdefault(key, {"tasks": {}})
    todo = [t for t in args.tasks if t not in run["tasks"]]
    if not todo:
        return
    import lm_eval
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(cfg.model, device="cpu")

    run["environment"] = {"model": loaded.name, "dtype": args.dtype, "lm_eval": lm_eval.__version__ if hasattr(
        lm_eval, "__version__") else None, "torch": torch.__version__, "bigbench_data": bigbench_offline.data_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads", "date": str(date.today())}
    for task in todo:
        started = time.time()
        bench = {"name": f"choose:{task}", "offline": True, "limit": args.limit, "batch_size": args.batch_size,
                 "tasks": [{"name": bigbench_offline.lm_eval_task_name(task)}]}
        result = evaluate_benchmark(loaded.model, loaded.tokenizer, bench, cache_dir, progress=True)
        row = result["tasks"][bigbench_offline.lm_eval_task_name(task)]
        row["seconds"] = round(time.time() - started, 1)
        row["lm_eval_version"] = result["lm_eval_version"]
        run["tasks"][task] = row
        atomic.write_json(args.results, store)
        print(f"{task}: acc={row['value']:.3f} (chance {row['chance']:.3f}, n={row['n_samples']}) "
              f"in {row['seconds']} s", flush=True)


def is_chosen(row: dict, min_z: float, min_margin: float) -> bool:
    margin = row["value"] - row["chance"]
    return margin >= min_margin and row["stderr"] is not None and margin >= min_z * row["stderr"]


def offline_suite() -> list[str]:
    import yaml

    cfg = yaml.safe_load((REPO / "conf" / "benchmark" / "offline.yaml").read_text())
    return [t["name"] if isinstance(t, dict) else t for t in cfg["tasks"]]


def report(store: dict, args) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `benchmarks/choose_offline_tasks.py` (rerun it to refresh; `--report-only` rewrites this",
        "file from `docs/offline_task_scores.json`).",
        "",
        "## Offline suite (`conf/benchmark/offline.yaml`)",
        "",
        "lm-eval's own `bigbench_<task>_multiple_choice` task definitions (template A: zero-shot,",
        "`acc` = the choice with the highest log-likelihood), run on rows converted from the `bigbench`",
        "package's JSON into the fields of the Hub dataset `hails/bigbench` those tasks read",
        "(`evaluation/bigbench_offline.py`). Candidates are English tasks without subtasks, with one",
        "correct choice and integer scores. A task clears the bar when SmolLM2-135M-Instruct beats chance",
        f"by at least {args.min_z:g} standard errors and {args.min_margin:g} absolute accuracy. This small model is",
        "at or below chance on most BIG-bench tasks, and only three tasks clear the bar at 100 examples;",
        "the suite (column 'in offline.yaml') is filled to six with the next tasks by margin over chance,",
        "each about 1.9 standard errors above it.",
        "",
        "Chance = mean over examples of 1 / (number of choices). Scores use the first `limit` examples",
        "of each task (lm-eval's `--limit`), so they are estimates with the standard error shown.",
        "",
        "Procedure used: a screening run (`--limit 50`) over the candidates, then a confirmation run",
        "(`--limit 100`) on the shortlist; the suite comes from the confirmation run. Picking the best of",
        "many candidates favours tasks that were lucky in the screen: the confirmation adds examples",
        "51-100 where a task has them, but a task with 50 examples or fewer is re-measured on the same",
        "examples, so for those the confirmation is not independent.",
        "",
    ]
    suite = offline_suite()
    final_key = args.final_run or (list(store["runs"])[-1] if store["runs"] else None)
    for key, run in store["runs"].items():
        env = run.get("environment", {})
        lines += [f"### Run: {key}" + (" (the one the offline suite is chosen from)" if key == final_key else ""), ""]
        if env:
            lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
        lines += ["| task (lm-eval) | clears the bar | in offline.yaml | acc | stderr | chance | acc - chance | n "
                  "| task version | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        rows = sorted(run["tasks"].items(), key=lambda kv: kv[1]["chance"] - kv[1]["value"])
        chosen = [t for t, r in rows if is_chosen(r, args.min_z, args.min_margin)][: args.max_chosen]
        for task, r in rows:
            lines.append(
                f"| {bigbench_offline.lm_eval_task_name(task)} | {'yes' if task in chosen else ''} "
                f"| {'yes' if bigbench_offline.lm_eval_task_name(task) in suite else ''} | {r['value']:.3f} "
                f"| {r['stderr']:.3f} | {r['chance']:.3f} | {r['value'] - r['chance']:+.3f} | {r['n_samples']} "
                f"| {r['version']} | {r.get('seconds', '')} |"
            )
        lines += ["", f"Above the bar ({len(chosen)}): " + ", ".join(chosen), ""]
    lines += [
        "## Presets for machines with internet",
        "",
        "- `benchmark=replaceme_paper`: the ReplaceMe paper's suite (winogrande 5-shot; boolq, race,",
        "  openbookqa, piqa, sciq, lambada_openai 0-shot), lm-eval's Hub datasets.",
        "- `benchmark=leaderboard_core`: arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, mmlu.",
        "",
        "## Comparability and known uncertainty",
        "",
        "- The Hub dataset was pushed from the `bigbench` 0.0.1 tarball through the Hugging Face `bigbench`",
        "  dataset script; this project converts the PyPI release 1.0.0 with the same formatting steps",
        "  (duplicate removal, choices appended in the order of `numpy.random.RandomState(42)`, the",
        "  `Q:`/`A:` prefixes, `task_prefix`, stripped strings, int32 scores). Task JSON that changed",
        "  between the two releases would make rows differ; the rows were not compared with the Hub copy",
        "  (it cannot be reached here).",
        "- Retention (pruned / base per task) is only meaningful well above chance: near chance a pruned",
        "  model can 'retain' 100% by guessing.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

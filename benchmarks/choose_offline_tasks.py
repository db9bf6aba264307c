"""Choose the offline benchmark: BIG-bench MC tasks on which SmolLM2-135M scores clearly above chance.

Runs lm-eval's own ``bigbench_<task>_multiple_choice`` definitions on data converted from the
``bigbench`` package (see `depthbench.evaluation.bigbench_offline`), with the embedded SmolLM2 in the project's
default dtype, and writes ``docs/BENCHMARKS_BIGBENCH.md`` (the ``benchmark=bigbench`` preset): every
candidate with its score, standard error, examples evaluated, chance level and guessing baseline,
and which were chosen. A task is chosen when its accuracy exceeds the guessing baseline (chance, or always giving
the most common correct answer of the examples scored, whichever is higher) by at least ``--min-z`` standard errors and
``--min-margin`` absolute.

Results are appended to a JSON file task by task, so an interrupted run resumes; ``--report-only``
rewrites the Markdown from that file without evaluating anything.

    .venv/bin/python benchmarks/choose_offline_tasks.py --limit 50 --threads 1          # screen
    .venv/bin/python benchmarks/choose_offline_tasks.py --limit 100 --threads 1 --tasks ...  # confirm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from depthbench import atomic
from depthbench.evaluation import bigbench_offline

REPO = Path(__file__).resolve().parents[1]

# Every task screened (``--limit 50``). First and second screens: the English JSON tasks of the
# ``bigbench`` package without subtasks, with integer scores and one correct choice, that lm-eval
# defines as ``bigbench_<task>_multiple_choice``. Third screen: English tasks made of subtasks whose
# examples are all multiple choice (their first rows all come from the first subtask, see
# `depthbench.evaluation.bigbench_offline`). NOT_SCREENED lists the rest and why.
CANDIDATES = [
    "emoji_movie", "code_line_description", "physical_intuition", "similarities_abstraction",
    "phrase_relatedness", "intent_recognition", "odd_one_out", "riddle_sense", "human_organs_senses",
    "movie_recommendation", "social_iqa", "misconceptions", "entailed_polarity", "empirical_judgments",
    "anachronisms", "known_unknowns", "date_understanding", "simple_ethical_questions",
    "hyperbaton", "discourse_marker_prediction", "sports_understanding", "disambiguation_qa", "crass_ai",
    "identify_odd_metaphor", "ruin_names", "general_knowledge", "logical_sequence", "common_morpheme",
    "social_support", "fantasy_reasoning", "implicatures", "strategyqa", "nonsense_words_grammar", "physics",
    "analytic_entailment", "dark_humor_detection", "irony_identification", "crash_blossom",
    "sentence_ambiguity", "hindu_knowledge", "novel_concepts", "figure_of_speech_detection",
    # second screen
    "navigate", "winowhy", "epistemic_reasoning", "logical_fallacy_detection", "metaphor_boolean", "snarks",
    "mathematical_induction", "identify_math_theorems", "penguins_in_a_table",
    "evaluating_information_essentiality", "presuppositions_as_nli", "vitaminc_fact_verification",
    "moral_permissibility", "movie_dialog_same_or_different", "formal_fallacies_syllogisms_negation",
    "causal_judgment", "temporal_sequences", "logical_args", "suicide_risk", "play_dialog_same_or_different",
    # third screen: tasks made of subtasks
    "cause_and_effect", "arithmetic", "goal_step_wikihow", "conceptual_combinations", "hhh_alignment",
    "metaphor_understanding", "elementary_math_qa", "unit_interpretation",
]

# Tasks that lm-eval defines but that were not screened, and why.
NOT_SCREENED = {
    "not English (or translation / multilingual)": [
        "cryobiology_spanish", "english_russian_proverbs", "entailed_polarity_hindi", "hinglish_toxicity",
        "international_phonetic_alphabet_nli", "kannada", "language_identification", "misconceptions_russian",
        "parsinlu_qa", "persian_idioms", "salient_translation_error_detection", "swahili_english_proverbs",
        "swedish_to_german_proverbs", "what_is_the_tao", "which_wiki_edit", "multiemo", "kanji_ascii"],
    "tied best choices or fractional scores": [
        "emojis_emotion_prediction", "english_proverbs", "geometric_shapes", "gre_reading_comprehension",
        "reasoning_about_colored_objects", "strange_stories"],
    "subtasks with examples that are not multiple choice (the converter needs every example to be)": [
        "unit_conversion", "periodic_elements"],
    "too slow on this CPU for a suite that runs in minutes (dozens of choices per example, very long "
    "inputs, or a screen stopped after minutes)": [
        "checkmate_in_one", "dyck_languages", "mnist_ascii", "analogical_similarity", "implicit_relations",
        "abstract_narrative_understanding", "authorship_verification", "cifar10_classification",
        "intersect_geometry", "real_or_fake_text"],
    "not screened for lack of time": [
        "understanding_fables", "question_selection", "timedial", "logic_grid_puzzle", "logical_deduction",
        "tracking_shuffled_objects", "symbol_interpretation", "undo_permutation", "bbq_lite_json", "color",
        "cs_algorithms", "fact_checker", "key_value_maps"],
}


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
    p.add_argument("--output", type=Path, default=REPO / "docs" / "BENCHMARKS_BIGBENCH.md")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    p.add_argument("--final-run", default=None, help="run key the suite is chosen from (default: the last)")
    p.add_argument("--screen-run", default=None, help="run key of the screen (default: the first)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the Markdown from --results")
    args = p.parse_args(argv)

    store = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": {}}
    if not args.report_only:
        measure(args, store)
    if add_guessing(store):
        atomic.write_json(args.results, store)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.output, report(store, args))
    print(f"wrote {args.output}")
    return 0


def _run_key(args) -> str:
    return f"limit={args.limit},batch_size={args.batch_size},dtype={args.dtype}"


def measure(args, store: dict) -> None:
    from hydra import compose, initialize_config_dir

    from depthbench.evaluation.lm_eval_runner import evaluate_benchmark
    from depthbench.modeling.loading import default_cache_dir, load_model

    from depthbench.config_store import register_configs

    register_configs()
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
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads",
        "date": str(date.today())}
    for task in todo:
        started = time.time()
        bench = {"name": f"choose:{task}", "offline": True, "limit": args.limit, "batch_size": args.batch_size,
                 "tasks": [{"name": bigbench_offline.lm_eval_task_name(task)}]}
        result = evaluate_benchmark(loaded.model, loaded.tokenizer, bench, cache_dir, progress=True)
        row = result["tasks"][bigbench_offline.lm_eval_task_name(task)]
        row["seconds"] = round(time.time() - started, 1)
        row["lm_eval_version"] = result["lm_eval_version"]
        row["guessing"] = guessing(task, row["n_samples"])
        run["tasks"][task] = row
        atomic.write_json(args.results, store)
        print(f"{task}: acc={row['value']:.3f} (chance {row['chance']:.3f}, n={row['n_samples']}) "
              f"in {row['seconds']} s", flush=True)


def guessing(task: str, n: int) -> dict:
    """What guessing scores on the task's first ``n`` examples (the ones a ``--limit`` run scores).

    ``chance``: mean of 1 / (number of choices); ``most_common_share``: always answering the most
    common correct answer (a real risk on two-label tasks whose first examples share a label).
    """
    from collections import Counter

    rows = bigbench_offline.convert_task(task)[:n]
    answer, count = Counter(r["targets"][0] for r in rows).most_common(1)[0]
    return {"n": len(rows), "chance": sum(1 / len(r["multiple_choice_targets"]) for r in rows) / len(rows),
            "most_common_answer": answer, "most_common_share": count / len(rows)}


def add_guessing(store: dict) -> bool:
    """Adds ``guessing`` to every result row that lacks it; True when something was added."""
    changed = False
    for run in store["runs"].values():
        for task, row in run["tasks"].items():
            if "guessing" not in row:
                row["guessing"] = guessing(task, row["n_samples"])
                changed = True
    return changed


def baseline(row: dict) -> float:
    """The score to beat: chance (over all the task's examples and over those scored) or always
    giving the most common correct answer of the examples scored, whichever is highest."""
    g = row.get("guessing", {})
    return max(row["chance"], g.get("chance", 0.0), g.get("most_common_share", 0.0))


def is_chosen(row: dict, min_z: float, min_margin: float) -> bool:
    margin = row["value"] - baseline(row)
    return margin >= min_margin and row["stderr"] is not None and margin >= min_z * row["stderr"]


def beyond_screen(row: dict, screen_row: dict | None) -> tuple[float, float, int] | None:
    """Accuracy, its standard error and n on the examples a run adds beyond the screen's.

    Both runs score the first ``limit`` examples, so the screen's examples are the first
    ``screen_row['n_samples']`` of this run's; the correct counts are ``acc * n`` (lm-eval's acc is a
    mean of 0/1). Derived by subtraction, so an example whose answer flips between the two runs
    (bfloat16 batches differ) would shift it by 1/n.
    """
    if screen_row is None:
        return None
    n_new = row["n_samples"] - screen_row["n_samples"]
    if n_new < 2:
        return None
    correct = round(row["value"] * row["n_samples"]) - round(screen_row["value"] * screen_row["n_samples"])
    acc = correct / n_new
    return acc, (acc * (1 - acc) / (n_new - 1)) ** 0.5, n_new


def offline_suite() -> list[str]:
    import yaml

    cfg = yaml.safe_load((REPO / "conf" / "benchmark" / "bigbench.yaml").read_text())
    return [t["name"] if isinstance(t, dict) else t for t in cfg["tasks"]]


def offline_limit():
    import yaml

    return yaml.safe_load((REPO / "conf" / "benchmark" / "bigbench.yaml").read_text()).get("limit")


def _chosen(run: dict, args) -> list[str]:
    rows = sorted(run["tasks"].items(), key=lambda kv: baseline(kv[1]) - kv[1]["value"])
    return [t for t, r in rows if is_chosen(r, args.min_z, args.min_margin)][: args.max_chosen]


def report(store: dict, args) -> str:
    runs = store["runs"]
    keys = list(runs)
    final_key = args.final_run or (keys[-1] if keys else None)
    screen_key = args.screen_run or (keys[0] if keys else None)
    screen = runs.get(screen_key, {"tasks": {}}) if screen_key != final_key else {"tasks": {}}
    final = runs.get(final_key, {"tasks": {}})
    suite = offline_suite()
    suite_tasks = [bigbench_offline.bigbench_task_name(n) for n in suite]
    chosen_final = _chosen(final, args)
    screened = [t for t in screen["tasks"]]
    confirmed = [t for t in final["tasks"]]
    suite_seconds = sum(final["tasks"][t].get("seconds") or 0 for t in suite_tasks if t in final["tasks"])
    missing = [t for t in suite_tasks if t not in final["tasks"]]
    if set(suite_tasks) == set(chosen_final):
        suite_note = f"The suite is exactly the {len(suite_tasks)} tasks that clear the bar in the confirmation run."
    else:
        extra = [t for t in suite_tasks if t not in chosen_final]
        left = [t for t in chosen_final if t not in suite_tasks]
        suite_note = (f"The suite has {len(suite_tasks)} tasks; in it but not clearing the bar in the confirmation "
                      "run: "
                      f"{', '.join(extra) or 'none'}; clearing it but not in the suite: {', '.join(left) or 'none'}.")
    lines = [
        "# BIG-bench preset (`benchmark=bigbench`)",
        "",
        "Produced by `benchmarks/choose_offline_tasks.py` (rerun it to refresh; `--report-only` rewrites this",
        "file from `docs/offline_task_scores.json`). Needs BIG-bench 1.0.0, which the registry no longer serves "
        "(docs/USAGE.md,",
        "\"BIG-bench (optional)\"); the task scores below do not depend on the calibration text.",
        "",
        "## BIG-bench suite (`conf/benchmark/bigbench.yaml`; the offline default before the standard suite)",
        "",
        "lm-eval's own `bigbench_<task>_multiple_choice` task definitions (template A: zero-shot,",
        "`acc` = the choice with the highest log-likelihood; these definitions report no `acc_norm`), run",
        "on rows converted from the `bigbench` package's JSON into the fields of the Hub dataset",
        "`hails/bigbench` those tasks read (`evaluation/bigbench_offline.py`). Candidates are English",
        "tasks that lm-eval defines whose examples all have one correct choice and integer scores (for a",
        "task made of subtasks, the first `limit` rows all come from its first subtask). A",
        f"task clears the bar when SmolLM2-135M-Instruct beats the guessing baseline by at least {args.min_z:g}",
        f"standard errors and {args.min_margin:g} absolute accuracy. This small model is at or below chance on most",
        "BIG-bench tasks.",
        "",
        "Guessing baseline = the highest of: chance (mean over examples of 1 / number of choices, over",
        "all the task's examples and over the examples scored) and 'most common answer' (the share of",
        "the examples scored whose correct answer is their most common correct answer: what always",
        "giving that answer scores). The second matters on two-label tasks whose first examples share",
        "a label: e.g. a model that always answers one label scores 1.0 on a task whose first examples",
        "all have that label.",
        "",
        f"Screened: {len(screened)} tasks (run `{screen_key}`); confirmed: {len(confirmed)} (run `{final_key}`);",
        f"{len(chosen_final)} clear the bar in the confirmation run. {suite_note}",
        f"The suite's `limit` is {offline_limit()}; its tasks took {suite_seconds:.1f} s together on one model in the",
        "confirmation run (sum of the seconds column"
        + (f"; not measured there: {', '.join(missing)}" if missing else "")
        + ").",
        "",
        "Scores use the first `limit` examples of each task (lm-eval's `--limit`), so they are",
        "estimates with the standard error shown; z = (acc - baseline) / stderr. The 'chance' column is",
        "over all the task's examples.",
        "",
        "Procedure: a screening run (`--limit 50`) over the candidates (in three rounds, see",
        "`CANDIDATES` in the script), then a confirmation run (`--limit 100`) on a shortlist (tasks",
        "furthest above the baseline in the screen); the suite comes from the confirmation run. Picking",
        "the best of many candidates favours tasks that were lucky in the screen, and the confirmation's",
        "first 50 examples are the screen's. The column 'beyond the screen' therefore gives acc, standard",
        "error and n on the confirmation's other examples only (51-100, derived from the two runs), which",
        "played no part in the shortlist: that is the unbiased check (compared with the same baseline). A",
        "task with 50 examples or fewer has none, so its confirmation is the screen again, not an",
        "independent check.",
        "",
    ]
    skipped = [t for t in _chosen(screen, args) if t not in final["tasks"]]
    if skipped:
        lines += ["Cleared the bar in the screen but not confirmed: " + ", ".join(
            f"{t} ({screen['tasks'][t]['seconds']} s for {screen['tasks'][t]['n_samples']} examples)" for t in skipped)
            + ". Too slow for a suite that is run on every pruned model.", ""]
    lines += [
        "Timings are wall seconds with 1 torch thread on a 2-core machine shared with other jobs, so",
        "they vary with its load; compare them within a run rather than across runs.",
        "",
    ]
    for key, run in runs.items():
        env = run.get("environment", {})
        is_final = key == final_key
        lines += [f"### Run: {key}" + (" (confirmation: the one the offline suite is chosen from)" if is_final
                                       else " (screen)" if key == screen_key else ""), ""]
        if env:
            lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
        head = ("| task (lm-eval) | clears the bar | in bigbench.yaml | acc | stderr | chance | most common answer "
                "| baseline | acc - baseline | z | n | task version | seconds |")
        if is_final:
            head += " beyond the screen: acc +- stderr (n) | its acc - baseline |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        rows = sorted(run["tasks"].items(), key=lambda kv: baseline(kv[1]) - kv[1]["value"])
        chosen = _chosen(run, args)
        for task, r in rows:
            base = baseline(r)
            z = (r["value"] - base) / r["stderr"] if r["stderr"] else float("nan")
            g = r.get("guessing", {})
            common = f"{g['most_common_share']:.3f}" if g else ""
            line = (
                f"| {bigbench_offline.lm_eval_task_name(task)} | {'yes' if task in chosen else ''} "
                f"| {'yes' if bigbench_offline.lm_eval_task_name(task) in suite else ''} | {r['value']:.3f} "
                f"| {r['stderr']:.3f} | {r['chance']:.3f} | {common} | {base:.3f} | {r['value'] - base:+.3f} | {z:.1f} "
                f"| {r['n_samples']} | {r['version']} | {r.get('seconds', '')} |"
            )
            if is_final:
                b = beyond_screen(r, screen["tasks"].get(task))
                line += (f" {b[0]:.3f} +- {b[1]:.3f} ({b[2]}) | {b[0] - base:+.3f} |" if b else " none | |")
            lines.append(line)
        lines += ["", f"Above the bar ({len(chosen)}): " + ", ".join(chosen), ""]
    lines += ["Not screened (BIG-bench multiple-choice tasks that lm-eval defines):", ""]
    lines += [f"- {why}: {', '.join(tasks)}" for why, tasks in NOT_SCREENED.items()]
    lines += [""]
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

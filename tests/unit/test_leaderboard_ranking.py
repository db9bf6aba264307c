"""Leaderboard: rank with ties from per-example results, intervals, fidelity columns, the pairwise table
and the Pareto plot, on synthetic result records with a known answer."""

import numpy as np
import pytest

from depthbench.evaluation.retention import retention_report
from depthbench.experiments import leaderboard
from depthbench.experiments.plots import pareto_front
from depthbench.experiments.ranking import rank_groups

TASKS = ("bigbench_a_multiple_choice", "bigbench_b_multiple_choice")


def _bench(correct_by_task):
    return {"tasks": {t: {"value": float(np.mean(c)), "stderr": float(np.std(c, ddof=1) / np.sqrt(len(c))),
                          "samples": {"doc_id": list(range(len(c))), "correct": [int(x) for x in c]}}
                      for t, c in correct_by_task.items()}}


def _record(method, correct_by_task, base_correct, digest, speedup=1.3, consistent=True):
    base_b, pruned_b = _bench(base_correct), _bench(correct_by_task)
    base = {"heldout_perplexity": {"perplexity": 20.0}, "benchmark": base_b,
            "tasks": {t: v["value"] for t, v in base_b["tasks"].items()}}
    pruned = {"heldout_perplexity": {"perplexity": 50.0}, "benchmark": pruned_b,
              "tasks": {t: v["value"] for t, v in pruned_b["tasks"].items()}}
    pruned["average"] = float(np.mean(list(pruned["tasks"].values())))
    base["average"] = float(np.mean(list(base["tasks"].values())))
    return {
        "config_hash": digest, "model": {"name": "tiny"}, "method": method, "ratio": 0.25, "seed": 0,
        "pruning": {"removed_layers": [1, 2], "fraction_parameters_removed": 0.2,
                    "fraction_parameters_removed_without_embeddings": 0.25},
        "stages": {"prune.score": {"seconds": 1.0}},
        "metrics": {"base": base, "pruned": pruned, "retention": retention_report(base, pruned),
                    "fidelity": {"kl_mean": 0.5, "kl_stderr": 0.01, "kl_p99": 3.0, "top1_agreement_percent": 70.0,
                                 "rms_delta_p_correct": 0.1,
                                 "flips": {t: {"examples": 10, "right_to_wrong_percent": 20.0,
                                               "wrong_to_right_percent": 10.0} for t in TASKS}},
                    "speedup": {"prefill": speedup, "prefill_interval": [speedup - 0.05, speedup + 0.05],
                                "prefill_consistent": consistent, "decode": speedup,
                                "decode_interval": [speedup - 0.1, speedup + 0.1], "decode_consistent": consistent},
                    "speed": {}},
    }


def _records():
    rng = np.random.default_rng(0)
    base = {t: rng.random(300) < 0.7 for t in TASKS}
    good = {t: rng.random(300) < 0.65 for t in TASKS}
    weak = {t: rng.random(300) < 0.35 for t in TASKS}
    return [_record("good", good, base, "h1", speedup=1.3), _record("weak", weak, base, "h2", speedup=1.35),
            _record("weak_twin", {t: v.copy() for t, v in weak.items()}, base, "h3", speedup=1.2, consistent=False)]


def test_ranks_ties_intervals_and_fidelity_columns(tmp_path):
    frame = leaderboard.build_frame(_records(), rank_by="tasks")
    by_method = frame.set_index("method")
    assert by_method.loc["good", "rank"] == "1"
    assert by_method.loc["weak", "rank"] == "2=" and by_method.loc["weak_twin", "rank"] == "2="
    assert by_method.loc["base (dense)", "rank"] == "reference"
    assert by_method.loc["good", "average_lo"] < by_method.loc["good", "average"] < by_method.loc["good", "average_hi"]
    assert by_method.loc["good", "retention_lo"] < by_method.loc["good", "retention_%"]
    assert by_method.loc["good", "kl"] == 0.5 and by_method.loc["good", "right_to_wrong_%"] == 20.0
    good_a = _records()[0]["metrics"]["pruned"]["benchmark"]["tasks"][TASKS[0]]["samples"]["correct"]
    assert by_method.loc["good", "stderr:a"] == pytest.approx(np.std(good_a, ddof=1) / np.sqrt(len(good_a)))

    paths = leaderboard.write_leaderboard(frame, tmp_path)
    md = paths["md"].read_text()
    assert "## Pairwise comparisons" in md and "weak_twin" in md
    assert "Ranked by the average-task accuracy" in md and "(!)" in md  # how it ranked; inconsistent speed-up flagged
    assert paths["pareto_plot"].is_file()
    pairs = frame.attrs["pairs"]
    assert {(p["a"], p["b"]) for p in pairs if p["significant"]} == {("good", "weak"), ("good", "weak_twin")}


def test_records_without_per_example_results_get_no_rank():
    records = _records()
    for r in records:
        for t in r["metrics"]["pruned"]["benchmark"]["tasks"].values():
            t.pop("samples")
    frame = leaderboard.build_frame(records, rank_by="tasks")
    assert frame.loc[frame["row_kind"] != "base", "rank"].isna().all()


def test_pareto_front_by_hand():
    points = [(1.0, 0.9), (1.2, 0.8), (1.1, 0.7), (1.5, 0.5), (1.4, 0.4)]
    assert pareto_front(points) == [0, 1, 3]


def test_healed_runs_are_ranked_among_runs_with_the_same_healing_on_their_healed_scores():
    """A healed run is compared with other runs healed the same way, on the healed model's per-example results
    (the pruned-only numbers it also carries would rank the wrong model)."""
    rng = np.random.default_rng(1)
    base = {t: rng.random(300) < 0.7 for t in TASKS}
    good = {t: rng.random(300) < 0.65 for t in TASKS}
    weak = {t: rng.random(300) < 0.35 for t in TASKS}
    plain_good, plain_weak = _record("a", good, base, "p1"), _record("b", weak, base, "p2")
    # healed: the pruned-only numbers say a > b, the healed ones b > a
    healed_a, healed_b = _record("a", good, base, "l1"), _record("b", weak, base, "l2")
    for record, healed_correct in ((healed_a, weak), (healed_b, good)):
        healed = _record("x", healed_correct, base, "x")["metrics"]["pruned"]
        record["healing"] = {"method": "lora", "steps": 8, "tokens": 8192}
        record["metrics"]["healed"] = healed
    ranking = rank_groups([plain_good, plain_weak, healed_a, healed_b], rank_by="tasks")
    ranks, pairs = ranking.ranks, ranking.pairs
    assert ranks == {"p1": "1", "p2": "2", "l2": "1", "l1": "2"}
    assert {p["healing"] for p in pairs} == {"none", "lora:8:8192"} and len(pairs) == 2
    assert "healing" in leaderboard.pairwise_markdown(pairs)

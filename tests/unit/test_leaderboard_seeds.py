"""Leaderboard: runs that differ only in their seeds are aggregated into mean and sample std (checked against
numbers computed by hand), per-seed rows stay in the CSV, sub-block columns (derived for older records), and the
one-run summary naming removed sub-blocks."""

import math

import pandas as pd
import pytest

from depthbench.evaluation.retention import retention_report
from depthbench.experiments import leaderboard
from depthbench.report import summary_table

N = 10  # examples per task: a task score of k/10 comes from k correct examples


def _samples(k):
    return {"doc_id": list(range(N)), "correct": [1] * k + [0] * (N - k)}


def _record(digest, method="random_layers", ratio=0.25, pruner_seed=None, seed=0, correct=(5, 2), ppl=30.0,
            n_samples=32, pruning=None, speedup=1.3):
    tasks = {"task_a": correct[0] / N, "task_b": correct[1] / N}
    bench = {"tasks": {t: {"value": v, "stderr": 0.01, "samples": _samples(k)}
                       for (t, v), k in zip(tasks.items(), correct)}}
    base_tasks = {"task_a": 0.8, "task_b": 0.6}
    base_bench = {"tasks": {t: {"value": v, "stderr": 0.01, "samples": _samples(round(v * N))}
                            for t, v in base_tasks.items()}}
    options = {} if pruner_seed is None else {"seed": pruner_seed}
    base = {"heldout_perplexity": {"perplexity": 20.0}, "tasks": base_tasks, "average": 0.7, "benchmark": base_bench}
    pruned = {"heldout_perplexity": {"perplexity": ppl}, "tasks": tasks, "average": sum(tasks.values()) / 2,
              "benchmark": bench}
    return {
        "config_hash": digest, "model": {"name": "tiny"}, "method": method, "ratio": ratio, "seed": seed,
        "config": {"seed": seed, "ratio": ratio, "pruner": {"name": method, "options": options},
                   "calibration": {"n_samples": n_samples}, "progress": False},
        "pruning": {"removed_layers": [1, 2], "options": options, "fraction_parameters_removed": 0.2,
                    "fraction_parameters_removed_without_embeddings": 0.25, **(pruning or {})},
        "stages": {"prune.select": {"seconds": 1.0}},
        "metrics": {"base": base, "pruned": pruned, "retention": retention_report(base, pruned), "speed": {},
                    "speedup": {"prefill": speedup, "prefill_interval": [speedup - 0.01, speedup + 0.01],
                                "prefill_consistent": True, "decode": speedup, "decode_consistent": True}},
    }


def _records():
    return [
        # random_layers, three seeds of the draw: task_a 0.5/0.6/0.7, task_b 0.2/0.2/0.5, ppl 30/40/50
        _record("r1", pruner_seed=1, correct=(5, 2), ppl=30.0, speedup=1.2),
        _record("r2", pruner_seed=2, correct=(6, 2), ppl=40.0, speedup=1.3),
        _record("r3", pruner_seed=3, correct=(7, 5), ppl=50.0, speedup=1.4),
        # same method and seed as r1 but another calibration size: a different config, not a seed of the group
        _record("r4", pruner_seed=1, correct=(9, 9), n_samples=64),
        # a deterministic method run with two run-level seeds
        _record("s0", method="shortgpt", seed=0, correct=(8, 6), ppl=25.0),
        _record("s1", method="shortgpt", seed=1, correct=(8, 4), ppl=27.0),
    ]


def test_seed_mean_and_std_by_hand_and_per_seed_rows_kept(tmp_path):
    frame = leaderboard.build_frame(_records(), rank_by="tasks")
    means = frame[frame["row_kind"] == "seed mean"].set_index("method")
    assert sorted(means.index) == ["random_layers", "shortgpt"]
    rnd = means.loc["random_layers"]
    assert rnd["n_seeds"] == 3 and rnd["seeds"] == "pruner.options.seed=1,2,3"
    assert rnd["task:task_a"] == pytest.approx(0.6) and rnd["std:task_a"] == pytest.approx(0.1)
    assert rnd["task:task_b"] == pytest.approx(0.3) and rnd["std:task_b"] == pytest.approx(math.sqrt(0.03))
    # per-seed averages 0.35, 0.40, 0.60: deviations -0.10, -0.05, +0.15, sum of squares 0.035 over n-1 = 2
    assert rnd["average"] == pytest.approx(0.45) and rnd["average_std"] == pytest.approx(math.sqrt(0.0175))
    assert rnd["ppl_pruned"] == pytest.approx(40.0) and rnd["ppl_pruned_std"] == pytest.approx(10.0)
    assert rnd["speedup_prefill"] == pytest.approx(1.3) and rnd["speedup_prefill_std"] == pytest.approx(0.1)
    # retention = mean of per-task ratios pruned / base, per seed: (0.5/0.8 + 0.2/0.6) / 2, ...
    retention = [100 * (a / 0.8 + b / 0.6) / 2 for a, b in ((0.5, 0.2), (0.6, 0.2), (0.7, 0.5))]
    assert rnd["retention_%"] == pytest.approx(sum(retention) / 3)
    assert pd.isna(rnd["average_lo"]) and rnd["removed_layers"] == ""
    short = means.loc["shortgpt"]
    assert short["n_seeds"] == 2 and short["seeds"] == "seed=0,1" and short["ppl_pruned"] == pytest.approx(26.0)
    assert short["ppl_pruned_std"] == pytest.approx(math.sqrt(2.0))

    kinds = frame.set_index("config_hash")["row_kind"]
    assert [kinds[h] for h in ("r1", "r2", "r3", "r4", "s0", "s1")] == ["seed"] * 3 + ["run"] + ["seed"] * 2
    # the mean row follows its seeds
    order = list(frame["config_hash"])
    assert order.index(f"seeds-{frame.set_index('config_hash').loc['r1', 'seed_group']}") == order.index("r3") + 1

    paths = leaderboard.write_leaderboard(frame, tmp_path)
    csv = pd.read_csv(paths["csv"])
    assert set(csv["config_hash"]) >= {"r1", "r2", "r3", "r4", "s0", "s1"}
    assert (csv["row_kind"] == "seed mean").sum() == 2
    md = paths["md"].read_text()
    table = [line for line in md.split("## Pairwise")[0].splitlines()
             if line.startswith("| ") and not line.startswith("| method")]
    assert len(table) == 4  # base, random_layers mean, random_layers (other config), shortgpt mean
    assert any("0.450 ± 0.132" in line and "40 ± 10" in line and "1.30 ± 0.10" in line for line in table)
    assert paths["pareto_plot"].is_file() and paths["task_heatmap"].is_file()
    assert md.split("\n")[2].rstrip().endswith("seeds |") and "ddof 1" in md
    pairs = md.split("## Pairwise")[1]  # the pairwise table names the pooled competitors
    assert "shortgpt (2 seeds)" in pairs and "random_layers#" in pairs and "(3 seeds)" in pairs


def test_the_seeds_of_a_group_share_one_rank_with_their_mean_row():
    frame = leaderboard.build_frame(_records(), rank_by="tasks")
    rows = frame.set_index("config_hash")
    seeds = {rows.loc[h, "rank"] for h in ("r1", "r2", "r3")}
    mean_rank = frame[(frame["row_kind"] == "seed mean") & (frame["method"] == "random_layers")]["rank"].iloc[0]
    assert len(seeds) == 1 and mean_rank == seeds.pop()


def _speed(record, decode, interval, limit, consistent):
    """The record with a decode speed-up measured as given (its interval, its limit, its own consistency flag)."""
    record["metrics"]["speedup"].update(decode=decode, decode_interval=list(interval), decode_limit=limit,
                                        decode_consistent=consistent)
    return record


@pytest.mark.parametrize("speeds, flagged", [
    # every seed's interval meets [1, 1.36] and the mean (1.30) lies inside: taken at face value
    ([(1.25, (1.2, 1.3), True), (1.30, (1.2, 1.4), True), (1.35, (1.1, 1.6), True)], False),
    # every seed's interval meets [1, 1.36] (wide: a loaded machine), but the mean (1.90) lies above the limit
    ([(1.30, (1.2, 1.4), True), (1.40, (0.9, 2.2), True), (3.00, (0.5, 18.0), True)], True),
    # one seed's own interval lies outside [1, limit]
    ([(1.30, (1.2, 1.4), True), (1.25, (1.2, 1.3), True), (1.35, (1.31, 1.4), False)], True),
])
def test_a_seed_mean_speedup_beyond_what_the_model_can_run_at_is_flagged(tmp_path, speeds, flagged):
    records = [_speed(_record(f"q{i}", pruner_seed=i), d, interval, 1.36, ok)
               for i, (d, interval, ok) in enumerate(speeds)]
    frame = leaderboard.build_frame(records)
    mean = frame[frame["row_kind"] == "seed mean"].iloc[0]
    assert mean["speedup_decode"] == pytest.approx(sum(d for d, _, _ in speeds) / 3)
    assert mean["speedup_decode_limit"] == pytest.approx(1.36)
    assert bool(mean["speedup_decode_consistent"]) is not flagged
    paths = leaderboard.write_leaderboard(frame, tmp_path)
    md = paths["md"].read_text()
    shown = [line for line in md.splitlines() if line.startswith("| random_layers")]
    assert len(shown) == 1 and shown[0].count("(!)") == int(flagged)
    assert ("(!) after a speed-up" in md) is flagged
    csv = pd.read_csv(paths["csv"]).set_index("config_hash")
    assert list(csv.loc[["q0", "q1", "q2"], "speedup_decode_limit"]) == [1.36] * 3


def test_a_single_seed_is_not_aggregated():
    frame = leaderboard.build_frame(_records()[3:4])
    assert list(frame["row_kind"]) == ["base", "run"] or set(frame["row_kind"]) == {"base", "run"}
    assert "seeds" not in leaderboard.display_frame(frame)


SUB_BLOCKS = {"removed_sub_blocks": ["3.attn", "5.mlp"], "removed_attention_modules": 3, "removed_mlp_modules": 3,
              "layer_equivalents_removed": 2.6, "kv_cache_fraction_removed": 0.3, "num_layers_before": 10}


def test_sub_block_columns_and_older_records_without_them():
    new = leaderboard.record_row(_record("b", method="blockish", pruning=SUB_BLOCKS))
    assert (new["removed_sub_blocks"], new["attn_removed"], new["mlp_removed"]) == ("3.attn 5.mlp", 3, 3)
    assert new["layer_equivalents"] == 2.6 and new["kv_removed_%"] == 30.0
    # a record written before sub-blocks: whole layers only, derived from removed_layers and the parameter counts
    old = leaderboard.record_row(_record("o", method="uidl", pruning={
        "num_layers_before": 10, "parameters_before": {"total": 1300, "without_embeddings": 1000, "per_layer": 100},
        "parameters_after": {"total": 1100, "without_embeddings": 800, "per_layer": 100}}))
    assert (old["removed_sub_blocks"], old["attn_removed"], old["mlp_removed"]) == ("", 2, 2)
    assert old["layer_equivalents"] == 2.0 and old["kv_removed_%"] == 20.0
    bare = leaderboard.record_row(_record("x", method="uidl"))
    assert bare["layer_equivalents"] is None and bare["kv_removed_%"] is None and bare["attn_removed"] == 2

    layer_only = leaderboard.display_frame(leaderboard.build_frame([_record("o2", method="uidl")]))
    assert list(layer_only["removed"]) == ["", "2 layers, 25.0%"]
    mixed = leaderboard.display_frame(leaderboard.build_frame(
        [_record("o2", method="uidl"), _record("b", method="blockish", pruning=SUB_BLOCKS)])).set_index("method")
    assert mixed.loc["blockish", "removed"] == "2.60 L-eq (3 attn + 3 mlp), 25.0%"


def _summary_record(pruning):
    base = {"num_layers_before": 10, "num_layers_after": 9, "removed_layers": [4],
            "parameters_before": {"total": 1300, "without_embeddings": 1000, "per_layer": 100},
            "parameters_after": {"total": 1040, "without_embeddings": 740, "per_layer": 100},
            "fraction_parameters_removed": 0.2, "fraction_parameters_removed_without_embeddings": 0.26}
    return {"method": "m", "model": {"name": "tiny"}, "ratio": 0.25, "pruning": {**base, **pruning}, "stages": {}}


def test_run_summary_names_removed_sub_blocks():
    text = summary_table(_summary_record(SUB_BLOCKS))
    assert "removed sub-blocks 3.attn, 5.mlp" in text
    assert "3 attention and 3 MLP modules" in text and "2.60 layer-equivalents" in text and "30.0% of the KV" in text
    assert "sub-blocks" not in summary_table(_summary_record({}))  # whole layers, or a record from before


def test_cli_prints_chosen_columns_and_refuses_unknown_ones_before_writing(tmp_path, capsys):
    import json as json_module

    for record in _records()[:2]:
        (tmp_path / record["config_hash"]).mkdir()
        (tmp_path / record["config_hash"] / "result.json").write_text(json_module.dumps(record))
    assert leaderboard.main([str(tmp_path), "--columns", "method,nope"]) == 2
    assert "unknown column(s) nope" in capsys.readouterr().err and not (tmp_path / "leaderboard.csv").exists()
    assert leaderboard.main([str(tmp_path), "--columns", "method,ppl_pruned"]) == 0
    table = capsys.readouterr().out.split("| method")[1]
    # the two runs differ only in their seed: one mean row (30 and 40), as in leaderboard.md
    assert "| random_layers |           35 |" in table and "| base (dense)  |           20 |" in table


def test_healing_columns_are_shown_only_when_a_run_was_healed():
    plain = leaderboard.display_frame(leaderboard.build_frame(_records()[:2]))
    assert not {"healing", "ppl_healed", "kl_healed"} & set(plain.columns)
    healed = []
    for seed, ppl in ((0, 12.0), (1, 14.0)):  # two seeds of one healed config: shown as their mean row
        record = _record(f"h{seed}", seed=seed)
        record["config"]["healing"] = {"name": "lora", "steps": 4}
        record["healing"] = {"method": "lora", "steps": 4, "tokens": 2048}
        record["metrics"]["healed"] = {"heldout_perplexity": {"perplexity": ppl}}
        healed.append(record)
    frame = leaderboard.build_frame([*_records()[:2], *healed])
    mean = frame[(frame["row_kind"] == "seed mean") & (frame["ppl_healed"] == 13.0)]
    assert len(mean) == 1 and mean["healing"].iloc[0] == "lora" and mean["ppl_healed_std"].iloc[0] == pytest.approx(
        2 ** 0.5)
    shown = leaderboard.display_frame(frame)
    assert {"healing", "ppl healed", "KL healed"} <= set(shown.columns)
    assert "13 ± 1.414" in set(shown["ppl healed"])


def test_the_calibration_draws_seed_follows_the_run_seed_into_one_seed_group():
    """``seed=1,2`` also changes ``calibration.seed`` (it interpolates ``seed``): those runs are one competitor, while
    another calibration size is not."""
    from depthbench.experiments.records import seed_group

    def with_seed(digest, seed, n_samples=8):
        record = _record(digest, seed=seed, n_samples=n_samples)
        record["config"]["calibration"]["seed"] = seed
        return record

    assert seed_group(with_seed("a", 0)) == seed_group(with_seed("b", 1)) == seed_group(with_seed("c", 2))
    assert seed_group(with_seed("d", 1, n_samples=64)) != seed_group(with_seed("b", 1))

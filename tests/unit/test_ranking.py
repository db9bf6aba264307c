"""Ranking on a declared metric: KL over held-out windows by default, seeds pooled into one competitor,
groups by the compression a run achieved, and clear errors, on synthetic records with a known answer."""

import json
import zlib

import numpy as np
import pytest

from depthbench.errors import ConfigError
from depthbench.experiments import leaderboard
from depthbench.experiments.ranking import compression_groups, rank_groups

WINDOWS, TOKENS = 40, 100


def _per_window(kl_mean: float, seed: int, spread: float = 0.1) -> dict:
    rng = np.random.default_rng(seed)
    kl = np.clip(kl_mean + spread * rng.standard_normal(WINDOWS), 0.01, None) * TOKENS
    return {"window": list(range(WINDOWS)), "tokens": [TOKENS] * WINDOWS, "kl": kl.tolist(),
            "nll": (kl + 3.0 * TOKENS).tolist(), "top1": (TOKENS * np.clip(0.9 - kl / TOKENS / 4, 0, 1)).tolist()}


def _record(digest, method, kl_mean, seed=0, pruner_seed=None, equivalents=8.0, ratio=0.25):
    options = {} if pruner_seed is None else {"seed": pruner_seed}
    per_window = _per_window(kl_mean, seed=zlib.crc32(f"{method}|{pruner_seed}|{seed}".encode()))
    return {
        "config_hash": digest, "model": {"name": "tiny"}, "method": method, "ratio": ratio, "seed": seed,
        "config": {"seed": seed, "ratio": ratio, "pruner": {"name": method, "options": options}},
        "pruning": {"removed_layers": [1, 2], "options": options, "fraction_parameters_removed": 0.2,
                    "fraction_parameters_removed_without_embeddings": 0.25, "layer_equivalents_removed": equivalents},
        "stages": {"prune.select": {"seconds": 1.0}},
        "metrics": {"base": {"heldout_perplexity": {"perplexity": 20.0}},
                    "pruned": {"heldout_perplexity": {"perplexity": 40.0}},
                    "fidelity": {"kl_mean": sum(per_window["kl"]) / (WINDOWS * TOKENS), "kl_stderr": 0.01,
                                 "kl_error_bound": 1e-4, "top1_agreement_percent": 80.0, "per_window": per_window}},
    }


def test_kl_ranks_by_default_lower_first_and_the_dense_row_is_the_reference(tmp_path):
    frame = leaderboard.build_frame([_record("g", "good", 0.5), _record("w", "weak", 2.0), _record("t", "twin", 2.0)])
    ranks = frame.set_index("method")["rank"]
    assert ranks["good"] == "1" and ranks["weak"] == "2=" and ranks["twin"] == "2="
    assert ranks["base (dense)"] == "reference"
    md = leaderboard.write_leaderboard(frame, tmp_path)["md"].read_text()
    assert md.startswith("Ranked by KL(dense || pruned) per token on the held-out windows")
    assert "KL ± SE (windows)" in md and "kl(a) - kl(b)" in md and "within 0.5 layer-equivalents" in md
    # the sentence states the tolerance the ranking used
    wider = leaderboard.build_frame([_record("g", "good", 0.5), _record("w", "weak", 2.0)], tolerance=1.5)
    assert "within 1.5 layer-equivalents" in leaderboard.ranking_note(wider)


@pytest.mark.parametrize("rank_by,best", [("perplexity", "good"), ("top1", "good")])
def test_other_window_metrics_rank_in_their_own_direction(rank_by, best):
    ranking = rank_groups([_record("g", "good", 0.5), _record("w", "weak", 2.0)], rank_by=rank_by)
    assert ranking.ranks == {"g": "1", "w": "2"}
    assert ranking.pairs[0]["a"] == best and ranking.pairs[0]["significant"]


def test_a_method_with_three_seeds_is_one_competitor():
    """Each seed of ``rnd`` is significantly better than ``mid``: ranked per seed (as before), ``mid`` would fall
    from 3 to 5; pooled, ``rnd`` counts once, so ``mid`` ranks as it does beside a single-seed ``rnd``."""
    fixed = [_record("a", "best", 0.3), _record("m", "mid", 2.0)]
    one_seed = rank_groups(fixed + [_record("r1", "rnd", 1.0, pruner_seed=1)])
    three = rank_groups(fixed + [_record(f"r{s}", "rnd", 1.0, pruner_seed=s) for s in (1, 2, 3)])
    assert one_seed.ranks["m"] == three.ranks["m"] == "3" and three.ranks["a"] == "1"
    assert three.ranks["r1"] == three.ranks["r2"] == three.ranks["r3"] == "2"
    assert len(three.pairs) == 3 and any("rnd (3 seeds)" in (p["a"], p["b"]) for p in three.pairs)
    without = rank_groups(fixed)
    assert int(three.ranks["m"]) - int(without.ranks["m"]) <= 1
    # the same three runs as three separate methods: three competitors, each significantly better than mid
    separate = rank_groups(fixed + [_record(f"r{s}", f"rnd{s}", 1.0, pruner_seed=s) for s in (1, 2, 3)])
    assert separate.ranks["m"] == "5"


def test_a_run_that_removed_a_different_amount_is_not_ranked_as_an_equal():
    """At ratio 0.25 the layer methods removed 8 layer-equivalents; a sub-block method removed 2: it is ranked in
    its own group, marked, and never paired with the others, however good its KL."""
    records = [_record("u", "uidl", 2.0), _record("s", "shortgpt", 1.0),
               _record("d", "llm_drop", 0.2, equivalents=2.0)]
    ranking = rank_groups(records)
    assert ranking.ranks == {"s": "1", "u": "2", "d": "1†"}
    assert ranking.compared_at["d"] == "2.00 L-eq" and ranking.compared_at["u"] == "8.00 L-eq"
    assert all("llm_drop" not in (p["a"], p["b"]) for p in ranking.pairs)


def test_compression_groups_by_hand():
    groups = compression_groups({"a": 8.0, "b": 8.3, "c": 8.6, "d": 2.0, "e": None}, tolerance=0.5)
    assert groups == {"a": "8.00-8.30 L-eq", "b": "8.00-8.30 L-eq", "c": "8.60 L-eq", "d": "2.00 L-eq",
                      "e": "layer-equivalents unknown"}


def test_unknown_rank_by_is_one_clear_error_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"rank_by='nope'.*allowed: kl, perplexity, top1, tasks"):
        rank_groups([_record("g", "good", 0.5)], rank_by="nope")
    for record in (_record("g", "good", 0.5), _record("w", "weak", 2.0)):
        (tmp_path / record["config_hash"]).mkdir()
        (tmp_path / record["config_hash"] / "result.json").write_text(json.dumps(record))
    assert leaderboard.main([str(tmp_path), "--rank-by", "nope"]) == 2
    err = capsys.readouterr().err
    assert "rank_by='nope'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "leaderboard.csv").exists() and not (tmp_path / "leaderboard.md").exists()


def test_runs_on_other_held_out_text_are_not_paired_window_by_window():
    """Window ids repeat on any text: runs evaluated on another held-out source form their own group."""
    other = _record("o", "other_text", 0.5)
    other["config"]["evaluation"] = {"perplexity": {"source": "another_text", "seq_len": 256}}
    ranking = rank_groups([_record("g", "good", 1.0), _record("w", "weak", 2.0), other])
    assert ranking.ranks == {"g": "1", "w": "2", "o": "1"}
    assert all("other_text" not in (p["a"], p["b"]) for p in ranking.pairs)


def test_the_compact_table_states_a_trained_methods_budget_only_when_one_trained():
    plain = leaderboard.display_frame(leaderboard.build_frame([_record("g", "good", 0.5), _record("w", "weak", 2.0)]))
    assert "train steps" not in plain
    trained = _record("t", "trained", 1.0)
    trained["pruning"]["budget"] = {"optimizer_steps": 290, "training_tokens": 1000, "calibration_tokens": 512}
    shown = leaderboard.display_frame(leaderboard.build_frame([_record("g", "good", 0.5), trained])).set_index("method")
    assert shown.loc["trained", "train steps"] == "290" and shown.loc["base (dense)", "train steps"] == ""

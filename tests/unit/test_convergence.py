"""Convergence of the trained replacements (issue 15): held-out split, objective curves, best state, the gap
to the closed-form optimum, budgets; each against an independent float64 computation or a rebuilt model."""

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.pruners import build_pruner
from depthbench.pruners.convergence import ConvergenceLog, holdout_split
from depthbench.pruners.methods.replaceme import train_transform
from tests.helpers import CONF, build_tiny_model, compose, random_batches, tiny_llama_config


def synthetic_rows(rows=240, d=6, noise=0.3, seed=0):
    """Token rows (M, Y, h) with ``h = Y + M T_true + noise``, float32 as the spill files hold them."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(rows, d)) * rng.uniform(0.5, 2.0, size=d)
    y = rng.normal(size=(rows, d))
    t_true = np.eye(d) + 0.5 * rng.normal(size=(d, d))
    h = y + m @ t_true + noise * rng.normal(size=(rows, d))
    return {"mlp_out": m.astype(np.float32), "attn_residual": y.astype(np.float32), "target": h.astype(np.float32)}


def mse_np(arrays, T, index=None):
    """Mean over rows and dimensions of (M T + Y - h)^2, float64 numpy."""
    m, y, h = (arrays[k].astype(np.float64) for k in ("mlp_out", "attn_residual", "target"))
    if index is not None:
        m, y, h = m[index], y[index], h[index]
    return float(np.mean((m @ np.asarray(T, dtype=np.float64) + y - h) ** 2))


def lstsq_np(arrays, index):
    m, y, h = (arrays[k].astype(np.float64)[index] for k in ("mlp_out", "attn_residual", "target"))
    return np.linalg.lstsq(m, h - y, rcond=None)[0]


def train(arrays, **kwargs):
    options = {"loss": "mse", "accurate": False, "lr": 1e-2, "epochs": 1, "batch_size": 64, "seed": 0,
               "device": "cpu", "progress": False, "what": "test"}
    options.update(kwargs)
    positional = [options.pop(k) for k in ("loss", "accurate", "lr", "epochs", "batch_size", "seed", "device",
                                           "progress", "what")]
    return train_transform(arrays, *positional, **options)


def test_holdout_split_is_seeded_disjoint_and_complete():
    train_a, held_a = holdout_split(50, 0.2, seed=3)
    train_b, held_b = holdout_split(50, 0.2, seed=3)
    assert len(held_a) == 10 and len(train_a) == 40
    assert set(train_a).isdisjoint(held_a) and sorted({*train_a, *held_a}) == list(range(50))
    assert np.array_equal(held_a, held_b) and np.array_equal(train_a, train_b)
    assert not np.array_equal(held_a, holdout_split(50, 0.2, seed=4)[1])
    assert len(holdout_split(50, 0.0, seed=3)[1]) == 0
    assert len(holdout_split(3, 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one row
    with pytest.raises(ConfigError, match="leaves none to train on"):
        holdout_split(1, 0.5, seed=0)


def test_adam_on_mse_reaches_the_least_squares_optimum_and_records_the_gap():
    arrays = synthetic_rows()
    everything = np.arange(240)
    T, info = train(arrays, lr=3e-2, epochs=600, batch_size=240, holdout=0.0, schedule="cosine")
    optimum = mse_np(arrays, lstsq_np(arrays, everything))
    reached = mse_np(arrays, T.numpy())
    assert info["ls_optimum"]["objective"] == pytest.approx(optimum, rel=1e-9)
    assert info["ls_optimum"]["relative_gap"] == pytest.approx((reached - optimum) / optimum, rel=1e-6, abs=1e-9)
    assert 0 <= info["ls_optimum"]["relative_gap"] < 1e-3  # Adam got there
    start = mse_np(arrays, np.eye(6))
    assert info["objective_at_identity"] == pytest.approx(start, rel=1e-9)
    assert (start - optimum) / optimum > 1  # and it had far to go
    # stopped early, the recorded gap is large and still the independent one
    T, info = train(arrays, lr=3e-2, epochs=5, batch_size=240, holdout=0.0)
    gap = (mse_np(arrays, T.numpy()) - optimum) / optimum
    assert gap > 0.1 and info["ls_optimum"]["relative_gap"] == pytest.approx(gap, rel=1e-7)


def test_the_gap_is_measured_on_the_training_rows_only():
    """With rows held out, the optimum recorded is the least squares of exactly the complement of the held-out
    rows (any other subset has another optimum); the held-out curve is the objective on the held-out rows."""
    arrays = synthetic_rows(rows=100)
    T, info = train(arrays, lr=1e-3, epochs=2, batch_size=16, holdout=0.25, seed=5)
    train_rows, held = holdout_split(100, 0.25, seed=5)
    assert (info["training_rows"], info["held_out_rows"]) == (75, 25)
    assert info["ls_optimum"]["objective"] == pytest.approx(mse_np(arrays, lstsq_np(arrays, train_rows), train_rows),
                                                            rel=1e-9)
    curve = info["convergence"]["curve"]
    assert curve[0]["held_out"] == pytest.approx(mse_np(arrays, np.eye(6), held), rel=1e-9)
    assert curve[-1]["held_out"] == pytest.approx(mse_np(arrays, T.numpy(), held), rel=1e-9)
    assert [c["step"] for c in curve] == [0, 5, 10]  # once per epoch: ceil(75 / 16) = 5 steps each


def test_a_singular_least_squares_system_only_drops_the_gap():
    """Fewer training rows than dimensions: Adam still trains on the mse objective, the gap is None with the
    reason; asking for init=ls there is an error naming the fix."""
    from depthbench.errors import NumericalError

    arrays = synthetic_rows(rows=5)
    _, info = train(arrays, epochs=2)
    assert info["ls_optimum"]["relative_gap"] is None and "singular" in info["ls_optimum"]["about"]
    with pytest.raises(NumericalError, match="singular"):
        train(arrays, init="ls")


def test_init_ls_starts_at_the_least_squares_objective():
    arrays = synthetic_rows()
    _, info = train(arrays, init="ls", lr=1e-30, epochs=1, holdout=0.1)
    train_rows, _ = holdout_split(240, 0.1, seed=0)
    T_ls = lstsq_np(arrays, train_rows)
    assert info["objective_at_init"] == pytest.approx(mse_np(arrays, T_ls), rel=1e-7)
    assert info["convergence"]["curve"][0]["train"] == pytest.approx(mse_np(arrays, T_ls, train_rows), rel=1e-7)
    assert info["ls_optimum"]["relative_gap"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("keep_best", [True, False])
def test_best_state_is_the_one_with_the_lowest_held_out_objective(keep_best, caplog):
    """Started at the least-squares optimum, a large constant learning rate only makes things worse: the last
    state is worse than the initial one, which the result and the log say; keep_best returns the best state."""
    arrays = synthetic_rows()
    with caplog.at_level(logging.WARNING, logger="depthbench.pruners.convergence"):
        T, info = train(arrays, init="ls", lr=0.3, epochs=3, batch_size=32, holdout=0.2, eval_every=2,
                        keep_best=keep_best)
    _, held = holdout_split(240, 0.2, seed=0)
    conv = info["convergence"]
    values = [c["held_out"] for c in conv["curve"]]
    assert conv["worse_than_initial"] is True and values[-1] > values[0]
    assert "ends worse than at initialisation" in caplog.text
    returned = mse_np(arrays, T.numpy(), held)
    if keep_best:
        assert returned == pytest.approx(min(values), rel=1e-9)
        assert conv["best_step"] == conv["curve"][int(np.argmin(values))]["step"] and conv["kept"] == "best"
    else:
        assert returned == pytest.approx(values[-1], rel=1e-9) and conv["kept"] == "last"


def test_convergence_log_keeps_the_best_state_not_the_last():
    log = ConvergenceLog("unit")
    for step, held, state in [(0, 5.0, "a"), (10, 3.0, "b"), (20, 1.0, "c"), (30, 4.0, "d")]:
        log.record(step, None, held, lambda s=state: s)
    summary = log.summary(kept_best=True)
    assert log.best_state == "c" and summary["best_step"] == 20 and summary["best_held_out"] == 1.0
    assert summary["worse_than_initial"] is False  # 4 < 5
    log.record(40, None, 6.0, lambda: "e")
    assert log.summary(kept_best=True)["worse_than_initial"] is True and log.best_state == "c"


def manual_removal(model, start: int, end: int):
    """The model rebuilt without layers [start, end): its ModuleList cut by hand."""
    out = copy.deepcopy(model)
    layers = out.model.layers
    out.model.layers = torch.nn.ModuleList([layer for k, layer in enumerate(layers) if not start <= k < end])
    out.config.num_hidden_layers = len(out.model.layers)
    return out


def test_tiny_lr_reproduces_the_untrained_replacements():
    """lr ~ 0: ReplaceMe-cosine's T stays the identity (the model equals the one without the block) and
    LLM-Streamline's layer stays the copy of layer j* (the model equals the one without layers j*+1..)."""
    model = build_tiny_model(tiny_llama_config(num_layers=6), seed=4)
    batches = random_batches(n_batches=3, batch_size=4, seed=4)
    for name, options in (("replaceme_cosine", {"epochs": 2, "batch_size": 16}),
                          ("llm_streamline", {"epochs": 2, "batch_size": 4, "min_lr": 0.0, "warmup_steps": 0})):
        pruned = copy.deepcopy(model)
        result = build_pruner(name, {**options, "lr": 1e-30}).prune(adapter_for(pruned), CalibrationData(batches, 16),
                                                                    2, progress=False)
        removed = result.removed_layers
        reference = manual_removal(model, removed[0], removed[-1] + 1)
        with torch.no_grad():
            for b in batches:
                torch.testing.assert_close(pruned(**b, use_cache=False).logits,
                                           reference(**b, use_cache=False).logits, rtol=0, atol=1e-6)


def test_budgets_equal_counts_from_the_data():
    model = build_tiny_model(tiny_llama_config(num_layers=6), seed=5)
    batches = random_batches(n_batches=3, batch_size=4, seed=5)
    masks = torch.cat([b["attention_mask"] for b in batches])
    tokens = int(masks.sum())

    result = build_pruner("replaceme_cosine", {"epochs": 3, "batch_size": 7, "holdout": 0.25}).prune(
        adapter_for(copy.deepcopy(model)), CalibrationData(batches, 16), 2, progress=False)
    held = round(0.25 * tokens)
    expected = {"calibration_tokens": tokens, "training_tokens": 3 * (tokens - held),
                "optimizer_steps": 3 * math.ceil((tokens - held) / 7), "epochs": 3.0}
    assert result.to_dict()["budget"] == expected
    assert result.replacement["budget"] == {**expected, "held_out_tokens": held}

    result = build_pruner("llm_streamline", {"epochs": 2, "batch_size": 3, "holdout": 0.25}).prune(
        adapter_for(copy.deepcopy(model)), CalibrationData(batches, 16), 2, progress=False)
    train_seq, held_seq = holdout_split(12, 0.25, seed=0)
    expected = {"calibration_tokens": tokens, "training_tokens": 2 * int(masks[train_seq].sum()),
                "optimizer_steps": 2 * math.ceil(9 / 3), "epochs": 2.0}
    assert result.to_dict()["budget"] == expected
    assert result.replacement["budget"] == {**expected, "held_out_tokens": int(masks[held_seq].sum())}

    result = build_pruner("uidl").prune(adapter_for(copy.deepcopy(model)), CalibrationData(batches, 16), 2,
                                        progress=False)
    assert result.to_dict()["budget"] == {"calibration_tokens": tokens, "training_tokens": 0, "optimizer_steps": 0,
                                          "epochs": 0.0}


@pytest.mark.parametrize("name", ["replaceme_cosine", "llm_streamline"])
@pytest.mark.parametrize("options, match", [
    ({"holdout": 1.0}, "holdout=1.0"),
    ({"holdout": 0.0, "keep_best": True}, "keep_best=true needs held-out"),
    ({"eval_every": -1}, "eval_every=-1"),
])
def test_convergence_options_are_checked(name, options, match):
    with pytest.raises(ConfigError, match=match):
        build_pruner(name, options)


def test_cosine_improvement_options_are_checked():
    with pytest.raises(ConfigError, match="init='zeros'; allowed: identity, ls"):
        build_pruner("replaceme_cosine", {"init": "zeros"})
    with pytest.raises(ConfigError, match="schedule='step'; allowed: constant, cosine"):
        build_pruner("replaceme_cosine", {"schedule": "step"})


def test_paper_scale_sets_each_references_calibration():
    """scale=paper: ReplaceMe's 8,000 x 1,024 per-document sequences, LLM-Streamline's packed 2,048-token ones,
    the default sizes for other methods; a command-line override still wins."""

    for name in ("replaceme_cosine", "replaceme_ls"):
        cal = compose(f"pruner={name}", "scale=paper").calibration
        assert (cal.n_samples, cal.seq_len, cal.packing) == (8000, 1024, False)
    cal = compose("pruner=llm_streamline", "scale=paper").calibration
    assert (cal.seq_len, cal.packing) == (2048, True)
    cal = compose("pruner=uidl", "scale=paper").calibration
    assert (cal.n_samples, cal.seq_len, cal.packing) == (128, 256, False)
    assert compose("pruner=replaceme_ls", "scale=paper", "calibration.n_samples=16").calibration.n_samples == 16


def test_faithfulness_grid_cells_compose_and_build():
    """Every cell of benchmarks/faithfulness.py is a valid config whose pruner builds (the study itself runs
    SmolLM2 and is not run here)."""
    from omegaconf import OmegaConf

    from depthbench.benchmarks import faithfulness as module

    cells = module.grid([1, 10], [15], [1e-4])
    # uidl, LS; cosine x {cosine, mse} x 2 epochs; mse whitened x 2 epochs; Streamline mse x 2 layouts; lm unpacked
    assert len(cells) == 2 + 2 * 2 + 2 + 2 + 1 and len({label for label, _ in cells}) == len(cells)
    packed = next(o for label, o in cells if "packed=2048" in label)
    assert {"calibration.packing=true", "calibration.seq_len=2048", "calibration.n_samples=16"} <= set(packed)
    for _, overrides in cells:
        cfg = compose(*overrides)
        build_pruner(cfg.pruner.name, OmegaConf.to_container(cfg.pruner.options, resolve=True))


def test_leaderboard_has_the_budget_columns():
    from depthbench.experiments.leaderboard import record_row

    budget = {"calibration_tokens": 30000, "training_tokens": 270000, "optimizer_steps": 290, "epochs": 10.0}
    record = {"model": {"name": "m"}, "method": "replaceme_cosine", "ratio": 0.25, "config_hash": "h",
              "stages": {"prune.fit": {"seconds": 1.0}},
              "pruning": {"removed_layers": [3, 4], "fraction_parameters_removed": 0.1,
                          "fraction_parameters_removed_without_embeddings": 0.2, "budget": budget}}
    row = record_row(record)
    assert (row["calibration_tokens"], row["training_tokens"], row["optimizer_steps"]) == (30000, 270000, 290)
    del record["pruning"]["budget"]  # a record written before the budget existed
    assert record_row(record)["training_tokens"] is None


def test_faithfulness_render_states_the_orderings_from_the_record(tmp_path):
    """docs/FAITHFULNESS.md is rendered from the study's record: flatness over the last quarter, and each ordering
    decided by the numbers in the record (here made so that one holds and one does not)."""
    from depthbench.benchmarks import faithfulness as module

    curve = [{"step": s, "train": None, "held_out": v} for s, v in ((0, 10.0), (50, 5.0), (80, 4.02), (100, 4.0))]
    assert module.flat(curve) is True  # 4.02 -> 4.0 over steps 75..100: 0.5%
    assert module.flat(curve, tolerance=0.001) is False
    assert module.flat(curve[:1]) is None

    def cell(ppl, steps=None, conv=None):
        return {"removed_layers": [11, 12, 13], "perplexity": ppl, "kl": ppl / 100, "seconds": 1.0,
                "budget": None if steps is None else {"optimizer_steps": steps, "training_tokens": 1000 * steps},
                "convergence": conv or []}

    conv = [{"curve": curve, "initial": 10.0, "last": 4.0, "best_held_out": 4.0, "worse_than_initial": False,
             "ls_relative_gap": 0.05}]
    record = {"settings": {"common_overrides": ["ratio=0.25"], "versions": {}}, "cells": {
        "uidl": cell(300.0), "replaceme_ls": cell(150.0),
        "replaceme_cosine loss=mse lr=0.001 epochs=10": cell(160.0, 320, conv),   # within 10% of LS
        "llm_streamline loss=mse packing=false steps=15": cell(400.0, 15, conv),  # worse than UIDL
    }}
    path = tmp_path / "f.json"
    path.write_text(json.dumps(record))
    text = module.render(path, tmp_path / "FAITHFULNESS.md")
    assert "reaches the closed-form LS (within 10% of its perplexity)**: holds" in text
    assert "better than dropping the block**: does not hold at the budgets measured" in text
    assert "gap to the LS optimum 5.000%" in text and "10 -> 4 (4)" in text
    assert (tmp_path / "faithfulness" / "perplexity_kl_vs_steps.png").is_file()


def ill_conditioned_rows(rows=400, d=6, seed=1):
    """`synthetic_rows` whose M columns span six orders of magnitude (1e-3 .. 1e2): the mse Hessian's
    condition number is about 1e10, as with the first-token activations of a real model."""
    arrays = synthetic_rows(rows=rows, d=d, noise=0.05, seed=seed)
    scales = np.logspace(-3, 2, d)
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(rows, d)) * scales
    t_true = np.eye(d) + rng.normal(size=(d, d)) / scales[:, None]  # each row of T matters at its column's scale
    arrays["mlp_out"] = m.astype(np.float32)
    arrays["target"] = (arrays["attn_residual"].astype(np.float64) + m @ t_true
                        + 0.05 * rng.normal(size=(rows, d))).astype(np.float32)
    return arrays


def test_whitening_makes_the_mse_hessian_the_identity():
    from depthbench.pruners.methods.replaceme import whitening

    arrays = ill_conditioned_rows()
    index = np.arange(0, 400, 2)
    P = whitening(arrays, index, 64, "cpu").numpy()
    m = arrays["mlp_out"].astype(np.float64)[index]
    hessian = m.T @ m / len(index)
    assert np.linalg.cond(hessian) > 1e8
    np.testing.assert_allclose(P.T @ hessian @ P, np.eye(6), atol=1e-8)
    assert np.allclose(np.tril(P, -1), 0)  # L^-T is upper triangular


def test_precondition_whiten_starts_where_none_starts_and_reaches_the_optimum():
    """Same objective, same start (T = identity at step 0, checked through the recorded objective and a zero
    learning rate); on an ill-conditioned problem Adam in whitened coordinates reaches the least-squares
    optimum in a budget where Adam on T's entries stays far from it."""
    arrays = ill_conditioned_rows()
    T0, still = train(arrays, precondition="whiten", lr=1e-30, epochs=1, holdout=0.0)
    np.testing.assert_allclose(T0.numpy(), np.eye(6), atol=1e-4)
    assert still["objective_at_identity"] == pytest.approx(mse_np(arrays, np.eye(6)), rel=1e-9)
    assert still["precondition"] == "whiten"
    budget = {"lr": 3e-2, "epochs": 300, "batch_size": 400, "holdout": 0.0, "schedule": "cosine"}
    T_white, white = train(arrays, precondition="whiten", **budget)
    _, plain = train(arrays, precondition="none", **budget)
    optimum = mse_np(arrays, lstsq_np(arrays, np.arange(400)))
    assert (mse_np(arrays, T_white.numpy()) - optimum) / optimum < 1e-2
    assert white["ls_optimum"]["relative_gap"] < 1e-2
    assert plain["ls_optimum"]["relative_gap"] > 10 * white["ls_optimum"]["relative_gap"]


def test_precondition_is_validated():
    with pytest.raises(ConfigError, match="precondition='sgd'; allowed: none, whiten"):
        build_pruner("replaceme_cosine", {"precondition": "sgd"})


@pytest.mark.parametrize("name,series,key,unit", [
    ("replaceme_cosine", "replaceme_cosine loss=cosine lr=0.0001", "epochs", "epochs"),
    ("llm_streamline", "llm_streamline loss=mse unpacked", "max_steps", "steps")])
def test_converged_scale_is_the_smallest_flat_budget_the_study_measured(name, series, key, unit):
    """conf/budget/pruner/converged_<name>.yaml holds a budget the study measured at the method's reference settings
    (docs/faithfulness.json): that cell's held-out objective is flat over its last quarter, and every smaller
    budget of the same series that moved the objective was not (a run too short to move it is trivially flat).
    Where no measured budget is flat yet (LLM-Streamline), the file holds the largest one and says so."""
    from omegaconf import OmegaConf

    from depthbench.benchmarks import faithfulness as module

    cells = json.loads((CONF.parent / "docs" / "faithfulness.json").read_text())["cells"]
    budget = OmegaConf.load(CONF / "budget" / "pruner" / f"converged_{name}.yaml").pruner.options[key]
    chosen = cells[f"{series} {unit}={budget}"]
    if not module.flat(chosen["convergence"][0]["curve"]):
        measured = [parsed[1] for parsed in map(module._series, cells) if parsed and parsed[0] == series]
        assert budget == max(measured)
        assert "not yet flat" in (CONF / "budget" / "pruner" / f"converged_{name}.yaml").read_text()  # and says so
        return
    for label, cell in cells.items():
        parsed = module._series(label)
        if parsed and parsed[0] == series and parsed[1] < budget:
            curve = cell["convergence"][0]["curve"]
            moved = abs(curve[-1]["held_out"] - curve[0]["held_out"]) > module.FLAT_TOLERANCE * curve[0]["held_out"]
            assert not (moved and module.flat(curve)), label

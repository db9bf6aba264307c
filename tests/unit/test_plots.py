"""Leaderboard plots of a healing sweep and of sub-block removal: each run is drawn with the metrics of the model it
ends with (the healed model's where it was healed, checked against the numbers put into the records), one line per
method x healing budget, a before/after-healing figure, and the layer-equivalents axis when sub-blocks were
removed."""

import pandas as pd
import pytest

from depthbench.experiments import leaderboard, plots
from tests.unit.test_leaderboard_seeds import _record


def _healed(record, steps, ppl, kl, digest):
    record = {**record, "config_hash": digest, "healing": {"method": "lora", "steps": steps, "tokens": steps * 1024},
              "metrics": {**record["metrics"], "healed": {"heldout_perplexity": {"perplexity": ppl},
                                                         "fidelity": {"kl_mean": kl}}}}
    record["config"] = {**record["config"], "healing": {"name": "lora", "steps": steps}}
    return record


def _sweep():
    records = []
    for method, ppl, kl in (("uidl", 300.0, 2.4), ("shortgpt", 500.0, 3.1)):
        for ratio in (0.25, 0.5):
            plain = _record(f"{method}{ratio}", method=method, ratio=ratio, ppl=ppl * ratio * 4)
            plain["metrics"]["fidelity"] = {"kl_mean": kl}
            records += [plain, _healed(plain, 8, ppl / 2, kl / 2, f"{method}{ratio}-8"),
                        _healed(plain, 32, ppl / 3, kl / 3, f"{method}{ratio}-32")]
    return records


def test_final_metrics_are_the_healed_models_where_healed():
    frame = plots.final_metrics(leaderboard.build_frame(_sweep()))
    rows = frame.set_index("config_hash")
    assert rows.loc["uidl0.25", "ppl_final"] == pytest.approx(300.0) and rows.loc["uidl0.25", "kl_final"] == 2.4
    assert rows.loc["uidl0.25", "healing_label"] == "pruned only"
    assert rows.loc["uidl0.5-8", "ppl_final"] == pytest.approx(150.0) and rows.loc["uidl0.5-8", "kl_final"] == 1.2
    assert rows.loc["uidl0.5-8", "healing_label"] == "lora 8 steps"
    assert rows.loc["shortgpt0.25-32", "ppl_final"] == pytest.approx(500.0 / 3)
    # the healed run's pruned-only numbers stay in their own columns
    assert rows.loc["shortgpt0.25-32", "ppl_pruned"] == pytest.approx(500.0)
    # a pruned model's interval is not carried over to the healed model it became
    assert pd.isna(rows.loc["uidl0.5-8", "average_final_lo"])


def test_one_line_per_method_and_healing_budget_and_a_before_after_figure(tmp_path, monkeypatch):
    drawn = []
    real = plots._line_plot

    def spy(frame, column, *args, **kwargs):
        groups = plots._pruned_rows(frame).dropna(subset=[column]).groupby(["method", "healing_label"])
        drawn.append((column, {key: sorted(g["ratio"]) for key, g in groups}))
        return real(frame, column, *args, **kwargs)

    monkeypatch.setattr(plots, "_line_plot", spy)
    paths = plots.write_plots(leaderboard.build_frame(_sweep()), tmp_path)
    assert paths["healing_plot"].is_file() and paths["perplexity_plot"].is_file()
    column, lines = drawn[0]
    assert column == "ppl_final" and len(lines) == 6  # 2 methods x (pruned only, 8 steps, 32 steps)
    assert lines[("uidl", "lora 32 steps")] == [0.25, 0.5]
    assert "perplexity_vs_removed_plot" not in paths  # whole layers only


def test_sub_block_rows_are_labelled_with_their_modules_and_drawn_against_layer_equivalents(tmp_path):
    sub = _record("drop", method="llm_drop", pruning={
        "removed_layers": [], "removed_sub_blocks": ["3.attn", "5.attn", "7.attn"], "removed_attention_modules": 3,
        "removed_mlp_modules": 0, "layer_equivalents_removed": 0.75})
    whole = _record("short", method="shortgpt")
    frame = plots.final_metrics(leaderboard.build_frame([sub, whole]))
    labels = {r.config_hash: plots._label(r) for _, r in frame.iterrows() if r.config_hash in ("drop", "short")}
    assert labels == {"drop": "llm_drop r=0.25 (3 attn + 0 mlp)", "short": "shortgpt r=0.25 (2 layers)"}
    paths = plots.write_plots(leaderboard.build_frame([sub, whole]), tmp_path)
    assert paths["perplexity_vs_removed_plot"].is_file() and "healing_plot" not in paths


def test_every_registered_method_has_its_own_colour_and_marker_in_every_plot():
    from depthbench.pruners.base import pruner_registry

    names = pruner_registry.names()
    styles = plots.method_styles(names)
    assert len({(tuple(c), m) for c, m in styles.values()}) == len(names)
    assert plots.method_styles(["uidl", "plugin_x"])["uidl"] == styles["uidl"]  # stable whatever else is drawn


def test_an_outlier_is_drawn_at_the_edge_and_named_instead_of_squashing_the_axis():
    plt = plots._pyplot()
    fig, ax = plt.subplots()
    values = pd.Series([1.1, 1.3, 1.8, 2.4, 3.0e16])
    ax.plot(range(5), values)
    ax.set_yscale("log")
    outside = plots._clip_outliers(ax, values, log=True, names=list("abcde"), xs=pd.Series(range(5), dtype=float))
    assert outside == [4]
    bottom, top = ax.get_ylim()
    assert 2.4 < top < 100 and bottom < 1.1
    assert [t.get_text() for t in ax.texts] == ["e: 3e+16 (above)"]
    assert plots._clip_outliers(ax, values[:4], log=True, names=list("abcd"), xs=pd.Series(range(4), dtype=float)) == []
    plt.close(fig)

"""Retention: per-task pruned / base and the average in percent, against hand-computed numbers."""

import math

import pytest

from depthbench.errors import ConfigError
from depthbench.evaluation.retention import retention


def test_per_task_ratio_and_average_percent():
    base = {"a": 0.80, "b": 0.50, "c": 0.40}
    pruned = {"a": 0.60, "b": 0.50, "c": 0.10}
    r = retention(base, pruned)
    assert r["per_task"] == pytest.approx({"a": 0.75, "b": 1.0, "c": 0.25})
    assert r["average_percent"] == pytest.approx(100 * (0.75 + 1.0 + 0.25) / 3)  # 66.666...
    assert r["ratio_of_averages_percent"] == pytest.approx(100 * (1.2 / 3) / (1.7 / 3))
    assert r["tasks"] == 3


def test_accepts_evaluate_benchmark_results():
    base = {"tasks": {"t1": {"value": 0.4, "metric": "acc"}, "t2": {"value": 0.2}}}
    pruned = {"tasks": {"t1": {"value": 0.3}, "t2": {"value": 0.25}}}
    r = retention(base, pruned)
    assert r["per_task"]["t1"] == pytest.approx(0.75) and r["per_task"]["t2"] == pytest.approx(1.25)
    assert r["average_percent"] == pytest.approx(100.0)


def test_zero_base_score_is_left_out_of_the_average():
    r = retention({"a": 0.0, "b": 0.5}, {"a": 0.1, "b": 0.4})
    assert r["per_task"]["a"] is None
    assert r["average_percent"] == pytest.approx(80.0)


def test_mismatched_or_invalid_inputs_fail_clearly():
    with pytest.raises(ConfigError, match="different tasks.*c"):
        retention({"a": 0.5}, {"a": 0.5, "c": 0.1})
    with pytest.raises(ConfigError, match="finite number"):
        retention({"a": math.nan}, {"a": 0.5})
    with pytest.raises(ConfigError, match="no tasks"):
        retention({}, {})

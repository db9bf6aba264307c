"""Files read from installed data packages: a missing package, or a release without the data, is one clear error."""

from __future__ import annotations

import importlib.util

import pytest

from depthbench import packaged_files
from depthbench.errors import ConfigError


def test_a_missing_package_names_it_what_needs_it_and_the_alternative(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bigbench" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        packaged_files.packaged_file("bigbench", "benchmark_tasks", "X", instead="use Y")
    message = str(err.value)
    assert message.startswith("X needs the package `bigbench`, which is not installed") and message.endswith("; use Y")
    assert "0.0.1 stub" in message and "\n" not in message


def test_a_release_without_the_data_is_named_with_its_version(monkeypatch, tmp_path):
    """The registry's bigbench 0.0.1 is a stub without benchmark_tasks/: installed, but not usable."""
    monkeypatch.setattr(packaged_files, "package_dir", lambda *a, **k: tmp_path)
    monkeypatch.setattr(packaged_files, "_version", lambda dist: "0.0.1")
    with pytest.raises(ConfigError, match=r"X needs benchmark_tasks/a/task.json from the package `bigbench`, but the "
                                          r"installed `bigbench` \(0.0.1\) has no such file"):
        packaged_files.packaged_file("bigbench", "benchmark_tasks/a/task.json", "X")
    (tmp_path / "f.txt").write_text("x")
    assert packaged_files.packaged_file("bigbench", "f.txt", "X") == tmp_path / "f.txt"

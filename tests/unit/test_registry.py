import pytest

from depthbench.errors import ConfigError
from depthbench.registry import Registry
from depthbench.pruners import Pruner, build_pruner, pruner_registry
from depthbench.pruners.uidl import UIDLPruner


def test_unknown_pruner_lists_available():
    with pytest.raises(ConfigError, match=r"unknown pruner 'nope'; available: .*uidl"):
        build_pruner("nope")


def test_entry_point_plugins_are_found(monkeypatch):
    """A third-party pruner registered through the entry-point group, without a fork."""
    import depthbench.registry as registry_module

    class FakeEntryPoint:
        name, value = "my_method", "depthbench.pruners.uidl:UIDLPruner"

    monkeypatch.setattr(registry_module, "entry_points",
                        lambda group: [FakeEntryPoint()] if group == "depthbench.pruners" else [])
    reg = Registry("pruner", base=Pruner, entry_point_group="depthbench.pruners")
    assert reg.get("my_method") is UIDLPruner
    assert "my_method" in reg.names()


def test_registry_rejects_wrong_base():
    reg = Registry("pruner", base=Pruner)
    with pytest.raises(TypeError):
        reg.add("x", int)


def test_builtin_registered():
    assert "uidl" in pruner_registry.names()

import pytest

from depthbench.errors import ConfigError
from depthbench.registry import Registry
from depthbench.pruners import Pruner, build_pruner, pruner_registry
from depthbench.pruners.methods.uidl import UIDLPruner


def test_unknown_pruner_lists_available():
    with pytest.raises(ConfigError, match=r"unknown pruner 'nope'; available: .*uidl"):
        build_pruner("nope")


class MyMethod(UIDLPruner):
    """A plugin class whose ``name`` agrees with its entry point (not registered in the built-in registry)."""

    name = "my_method"


def _registry_with_entry_point(monkeypatch, entry_name: str, value: str) -> Registry:
    import depthbench.registry as registry_module

    class FakeEntryPoint:
        name = entry_name

    FakeEntryPoint.value = value
    monkeypatch.setattr(registry_module, "entry_points",
                        lambda group: [FakeEntryPoint()] if group == "depthbench.pruners" else [])
    return Registry("pruner", base=Pruner, entry_point_group="depthbench.pruners")


def test_entry_point_plugins_are_found(monkeypatch):
    """A third-party pruner registered through the entry-point group, without a fork."""
    reg = _registry_with_entry_point(monkeypatch, "my_method", "tests.unit.test_registry:MyMethod")
    assert reg.get("my_method") is MyMethod
    assert "my_method" in reg.names()


def test_a_plugin_whose_names_disagree_is_refused(monkeypatch):
    """The entry-point name (the config name) and the class's ``name`` (what records show) are one name."""
    reg = _registry_with_entry_point(monkeypatch, "my_method", "depthbench.pruners.methods.uidl:UIDLPruner")
    with pytest.raises(ConfigError, match=r"entry point is named 'my_method' but its class says name = 'uidl'"):
        reg.get("my_method")


def test_a_plugin_reusing_a_builtin_name_is_named_in_a_warning(monkeypatch, caplog):
    """The built-in keeps its name; the shadowed plugin is not silently dropped."""
    import depthbench.registry as registry_module

    class Clashing:
        name, value = "uidl", "my_package.pruners:MyUIDL"

    class SameObject:  # the built-in itself exposed as an entry point (e.g. an editable install): no warning
        name, value = "shortgpt", "depthbench.pruners.methods.uidl:UIDLPruner"

    monkeypatch.setattr(registry_module, "entry_points",
                        lambda group: [Clashing(), SameObject()] if group == "depthbench.pruners" else [])
    reg = Registry("pruner", base=Pruner, entry_point_group="depthbench.pruners")
    reg.add("uidl", UIDLPruner)
    reg.add("shortgpt", UIDLPruner)
    with caplog.at_level("WARNING", logger="depthbench.registry"):
        assert reg.get("uidl") is UIDLPruner
    assert len(caplog.records) == 1
    assert "my_package.pruners:MyUIDL" in caplog.text and "rename" in caplog.text


def test_registry_rejects_wrong_base():
    reg = Registry("pruner", base=Pruner)
    with pytest.raises(TypeError):
        reg.add("x", int)


def test_builtin_registered():
    assert "uidl" in pruner_registry.names()

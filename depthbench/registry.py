"""One small generic registry used for pruners, model adapters and calibration sources.

Entries are registered with a decorator under one or more aliases, may be lazy (``"module:object"``)
and may come from third-party packages through a Python entry-point group, so a new method needs no
fork. Lookups of unknown names raise a `ConfigError` that lists what is available.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from depthbench.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type | None = None, entry_point_group: str | None = None,
                 builtin_modules: tuple[str, ...] = ()):
        """``builtin_modules``: modules that register the built-in entries when imported, imported on the first
        lookup (before the entry points, so that a built-in name wins), not when the registry is created: the
        package that defines the registry then never imports its own entries at import time (no cycle)."""
        self.kind = kind
        self.base = base
        self.entry_point_group = entry_point_group
        self.builtin_modules = builtin_modules
        self._entries: dict[str, T | str] = {}
        self._from_entry_points: set[str] = set()
        self._entries_loaded = False

    def register(self, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            for alias in aliases:
                self.add(alias, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T | str) -> None:
        """Register ``obj`` (or a lazy ``"module:object"`` string) under ``name``."""
        existing = self._entries.get(name)
        if existing is not None and existing is not obj and existing != obj:
            raise ValueError(f"{self.kind} {name!r} is already registered as {existing!r}")
        if not isinstance(obj, str):
            self._check_base(name, obj)
        self._entries[name] = obj

    def get(self, name: str) -> T:
        self._load_entries()
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or '(none)'}"
            )
        obj = self._entries[name]
        if isinstance(obj, str):
            module_name, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module_name), attr)
            self._check_base(name, obj)
            self._check_plugin_name(name, obj)
            self._entries[name] = obj
        return obj

    def _check_plugin_name(self, name: str, obj: object) -> None:
        """A plugin's entry-point name is its config name; a ``name`` attribute (what records show) must agree."""
        declared = getattr(obj, "name", None)
        if name in self._from_entry_points and isinstance(declared, str) and declared != name:
            raise ConfigError(f"{self.kind} plugin {obj!r}: its entry point is named {name!r} but its class says "
                              f"name = {declared!r}; the two must be the same (rename one)")

    def names(self) -> list[str]:
        self._load_entries()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_entries()
        return name in self._entries

    def _check_base(self, name: str, obj: object) -> None:
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise TypeError(f"{self.kind} {name!r} must be a subclass of {self.base.__name__}, got {obj!r}")

    def _load_entries(self) -> None:
        if self._entries_loaded:
            return
        self._entries_loaded = True
        for module in self.builtin_modules:
            importlib.import_module(module)
        if self.entry_point_group is None:
            return
        for ep in entry_points(group=self.entry_point_group):
            existing = self._entries.get(ep.name)
            if existing is None:
                self._entries[ep.name] = ep.value
                self._from_entry_points.add(ep.name)
            elif ep.value != existing and ep.value != getattr(existing, "__module__", "") + ":" + getattr(
                    existing, "__name__", ""):
                log.warning("%s %r: the installed plugin %s (entry point group %s) is ignored because %r is "
                            "already a %s (%s); rename the plugin's entry point to use it", self.kind, ep.name,
                            ep.value, self.entry_point_group, ep.name, self.kind, existing)

"""Hydra's composition errors as one line naming the value and what is allowed.

Hydra refuses a bad command line before our code runs (an unknown config group option, a key the typed
settings do not declare, a value of the wrong type, an override it cannot parse) and prints several lines
of its own, with hints that do not apply here (``+key=value`` to append a key the schema refuses anyway)
and the schema's class names. `one_line` turns such an error into the form every other bad input gets from
``depthbench``: ``depthbench: error: <what>; allowed: <what is>``.
"""

from __future__ import annotations

import dataclasses
import typing

from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


def is_composition_error(err: BaseException) -> bool:
    """An error Hydra raises while composing the config from the command line (not one of a run)."""
    return isinstance(err, CompactHydraException)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def _declared_keys(object_type) -> list[str]:
    if object_type is None or not dataclasses.is_dataclass(object_type):
        return []
    return [f.name for f in dataclasses.fields(object_type)]


def _declared_type(object_type, key: str) -> str | None:
    if object_type is None or not dataclasses.is_dataclass(object_type):
        return None
    hints = typing.get_type_hints(object_type)
    kind = hints.get(key)
    if kind is None:
        return None
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _group_options(err: MissingConfigException) -> str:
    missing = err.missing_cfg_file or ""
    group, _, name = missing.rpartition("/")
    what = f"{group}={name}" if group else repr(missing)
    return f"{what}: no such config; allowed: {', '.join(sorted(err.options))}"


def one_line(err: BaseException) -> str:
    """``err`` (a Hydra composition error) as one line: the override, what is wrong, what is allowed."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.options:
        return _group_options(err)
    if isinstance(err, OverrideParseException):
        override = getattr(err, "override", None)
        problem = _first_line(str(err))
        prefix = f"{override}: " if override and override not in problem else ""
        return (f"{prefix}{problem}; overrides are KEY=VALUE (a sweep: KEY=A,B with -m); "
                "`depthbench --help` lists the keys")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        parent, _, key = str(cause.full_key).rpartition(".")
        allowed = _declared_keys(cause.object_type)
        where = parent or "the top level"
        listed = f"; allowed keys of {where}: {', '.join(allowed)}" if allowed else ""
        return f"{cause.full_key}: {where} has no setting {key!r}{listed}"
    if isinstance(cause, ValidationError) and cause.full_key:
        key = str(cause.full_key).rpartition(".")[2]
        kind = _declared_type(cause.object_type, key)
        problem = _first_line(str(cause))
        return f"{cause.full_key}: {problem}" + (f"; allowed: a value of type {kind}" if kind else "")
    parts = [_first_line(str(err))]
    if cause is not None:
        parts.append(_first_line(str(cause)))
    return ": ".join(p for p in parts if p)

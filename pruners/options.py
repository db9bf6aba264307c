"""A method's options, declared once: a typed dataclass whose fields carry their documentation.

    @dataclass
    class Options:
        lr: float = option(1e-4, "Adam learning rate (reference 1e-4).")

The same dataclass is (1) the Hydra config group entry ``pruner=<name>`` (a structured config stored by
`depthbench.config_store`, so ``pruner.options.lr=abc`` or an unknown key fails when Hydra composes),
(2) what `parse_options` checks a Python caller's dict against (types by OmegaConf's rules, unknown
keys refused), and (3) what ``depthbench --help`` and docs/METHODS.md list. Value checks that a type
cannot express (a positive learning rate, one of a few strings) stay in the pruner's
``validate_options``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from depthbench.errors import ConfigError


def option(default: Any, help: str) -> Any:  # noqa: A002 - the natural name, as argparse's
    """A dataclass field with its documentation (shown by ``depthbench --help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


def run_seed_option(help: str) -> Any:  # noqa: A002
    """An integer seed that follows the run's ``seed`` in a Hydra run (``pruner.options.<name>: ${seed}``, set by
    `depthbench.config_store`), so ``seed=1,2,3`` reseeds the method's own draws too; 0 for a Python caller
    who gives no value. A run may still set the option alone (``pruner.options.seed=5``)."""
    return dataclasses.field(default=0, metadata={"help": f"{help} Default: the run's `seed`.", "run_seed": True})


def run_seeded(schema) -> list[str]:
    """The options of ``schema`` declared with `run_seed_option`."""
    return [f.name for f in dataclasses.fields(schema) if f.metadata.get("run_seed")]


def option_help(schema) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` of every option of ``schema`` (a dataclass)."""
    out = []
    for f in dataclasses.fields(schema):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append((f.name, kind, f.default, f.metadata.get("help", "")))
    return out


def parse_options(pruner: str, schema, options: dict | None) -> Any:
    """``options`` checked against ``schema`` and returned as an instance of it; one `ConfigError`
    naming the option, the value and what is allowed otherwise."""
    options = dict(options or {})
    allowed = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for pruner {pruner!r}; "
                          f"allowed: {', '.join(sorted(allowed)) or '(none)'}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), options)
    except (ValidationError, ConfigKeyError) as err:
        key = getattr(err, "key", None) or getattr(err, "full_key", None)
        types = {f.name: f.type for f in dataclasses.fields(schema)}
        value = options.get(key, "?") if key else "?"
        raise ConfigError(f"pruner {pruner!r} option {key}={value!r}: {str(err).splitlines()[0]}; allowed: "
                          f"{types.get(key, 'see depthbench --help')}") from None
    return OmegaConf.to_object(merged)

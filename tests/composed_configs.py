"""Every composed config the shipped tree can produce, resolved: a dump that a change of the config mechanics
(typed settings, budgets) is compared against, so that the effective values stay what they were.

The cells: every preset (conf/experiment/*.yaml) expanded into the cells of its sweep, and, without a preset,
every entry of every selectable group (pruner, healing, calibration, evaluation, benchmark, model, logger), each
at every scale (conf/scale/*.yaml). A cell is stored as the flat keys where its resolved config differs from the
default one (``<absent>`` for a key it lacks), which keeps the file small and a difference readable.

    .venv/bin/python -m tests.composed_configs tests/data/composed_configs_before.json
"""

from __future__ import annotations

import itertools
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
ABSENT = "<absent>"
#: Values that a group entry needs and has no default for (``???``): set so that the cell resolves.
REQUIRED = {"calibration=local": ["calibration.path=/data/calibration.jsonl"],
            "evaluation=local": ["evaluation.path=/data/heldout.jsonl"],
            "model=hf": ["model.name_or_path=/models/any"]}


def compose(*overrides: str, hydra_cfg: bool = False):
    """The config composed from ``overrides`` (inside `composing`, without initialising Hydra again)."""
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)
    with composing():
        return compose(*overrides, hydra_cfg=hydra_cfg)


@contextmanager
def composing():
    """Hydra initialised once on conf/ for many compositions (seconds instead of minutes for all cells)."""
    from hydra import initialize_config_dir

    from depthbench.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def resolved(*overrides: str) -> dict:
    return OmegaConf.to_container(compose(*overrides), resolve=True)


def flat(data, prefix: str = "") -> dict:
    """``{"a.b": value}`` for every leaf (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for key, value in data.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    if not data and prefix:
        out[prefix] = {}
    return out


def diff(base: dict, other: dict) -> dict:
    a, b = flat(base), flat(other)
    return {key: b.get(key, ABSENT) for key in sorted(set(a) | set(b)) if a.get(key, ABSENT) != b.get(key, ABSENT)}


def preset_cells(preset: str) -> list[list[str]]:
    """The override lists of a preset's sweep cells (the product of its sweeper params)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not GlobalHydra.instance().is_initialized():
        with composing():
            return preset_cells(preset)
    params = compose(f"experiment={preset}", hydra_cfg=True).hydra.sweeper.params or {}
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    axes = []
    for key, values in params.items():
        if str(values).startswith("glob("):  # over the config group's options, as the sweeper expands it
            (override,) = parser.parse_overrides([f"{key}={values}"])
            values = list(override.sweep_string_iterator())
        else:  # "a,b": the values as written (cell names as in the recorded dump)
            values = str(values).split(",")
        axes.append([f"{key}={value}" for value in values])
    return [[f"experiment={preset}", *cell] for cell in itertools.product(*axes)]


def group_cells() -> list[list[str]]:
    from depthbench.pruners import pruner_registry

    cells = [[f"pruner={name}"] for name in pruner_registry.names()]
    for group in ("healing", "calibration", "evaluation", "benchmark", "model", "logger"):
        for entry in sorted((CONF / group).glob("*.yaml")):
            choice = f"{group}={entry.stem}"
            cells.append([choice, *REQUIRED.get(choice, [])])
    return cells


def all_cells() -> list[list[str]]:
    presets = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    cells = [[]] + group_cells() + [c for preset in presets for c in preset_cells(preset)]
    scales = sorted(p.stem for p in (CONF / "scale").glob("*.yaml"))
    return [[*cell, f"scale={scale}"] for cell in cells for scale in scales]


def dump() -> dict:
    """``{"base": the default config, "cells": {cell: its difference from the base}}``."""
    with composing():
        base = resolved()
        return {"base": base, "cells": {" ".join(cell): diff(base, resolved(*cell)) for cell in all_cells()}}


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(dump(), indent=1, sort_keys=True, default=str) + "\n")

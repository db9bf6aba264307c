"""Structured config entries that Hydra composes beside the YAML tree in `depthbench.conf`.

Every registered pruner (built-in or installed through the ``depthbench.pruners`` entry point) becomes
the config group entry ``pruner=<name>``: ``{name, options}`` (plus the pruner-level Prune&Comp keys
``compensate``, ``compensate_mode``, ``compensate_fold``) with ``options`` typed by the method's
``Options`` dataclass, so Hydra itself refuses an unknown option or a value of the wrong type when it
composes, and the options are declared in one place (the dataclass, with its documentation).
"""

from __future__ import annotations

import hashlib

from hydra.core.config_store import ConfigStore

#: The longest cell folder name in bytes: file systems refuse a path component over 255 bytes.
FOLDER_NAME_MAX_BYTES = 200


def folder_name(overrides: str) -> str:
    """A sweep cell's folder name from its overrides (``hydra.job.override_dirname``): a path separator in a value
    (``calibration.path=/data/x.jsonl``) becomes ``_`` so the cell stays one folder below the sweep. A name longer
    than `FOLDER_NAME_MAX_BYTES` keeps its start and ends in a hash of the whole name, so that it stays a valid
    folder, differs from every other cell's and is the same on a resumed run."""
    name = overrides.replace("/", "_").replace("\\", "_")
    encoded = name.encode()
    if len(encoded) <= FOLDER_NAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    head = encoded[: FOLDER_NAME_MAX_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"


def register_configs() -> None:
    """Store ``pruner/<name>`` for every pruner in the registry, the typed settings of every other group as
    ``schema/<group>/<kind>`` (`depthbench.settings`), and the ``folder_name`` resolver that
    conf/hydra/default.yaml names cells with (idempotent)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)
    register_group_schemas()

    from depthbench.pruners import pruner_registry
    from depthbench.pruners.options import run_seeded

    store = ConfigStore.instance()
    for name in pruner_registry.names():
        pruner = pruner_registry.get(name)
        options = OmegaConf.structured(pruner.Options)
        for key in run_seeded(pruner.Options):  # a method's own seed follows the run's unless set
            options[key] = "${seed}"
        # compensate*: the pruner-level Prune&Comp setting (`depthbench.pruners.methods.compensation`), any method
        store.store(group="pruner", name=name, node={"name": name, "options": options, "compensate": "none",
                                                     "compensate_mode": "iterative", "compensate_fold": "after"},
                    provider="depthbench")


def register_group_schemas() -> None:
    """``schema/<group>/<kind>``: the structured config a YAML entry of ``<group>`` extends (its defaults list
    names it), so that composing refuses an unknown key or a mistyped value of that group."""
    from omegaconf import OmegaConf

    from depthbench.settings import group_schemas

    from depthbench.settings import RunSettings

    store = ConfigStore.instance()
    # the run level (conf/config.yaml's knobs, cache, efficiency): the primary config extends it
    run = OmegaConf.structured(RunSettings)
    for node in (run, run.cache):  # CacheSettings is frozen at run time, not as a schema (its node sets its own flag)
        OmegaConf.set_readonly(node, False)
    store.store(group="schema", name="run", node=run, provider="depthbench")
    for group, kinds in group_schemas().items():
        for kind, schema in kinds.items():
            node = OmegaConf.structured(schema)
            OmegaConf.set_readonly(node, False)  # a frozen settings class (healing) is a schema, not a constant
            store.store(group=f"schema/{group}", name=kind, node=node, provider="depthbench")

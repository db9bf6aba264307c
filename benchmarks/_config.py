"""The project's config as the CLI composes it, for studies that build a run's settings without the CLI."""

from __future__ import annotations


def compose(*overrides: str):
    """conf/config.yaml (the installed ``depthbench.conf``) with every registered pruner and ``overrides``."""
    from hydra import compose as hydra_compose, initialize_config_module

    from depthbench.config_store import register_configs

    register_configs()
    with initialize_config_module(config_module="depthbench.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))

"""The ``cache`` config node (conf/config.yaml), parsed and checked once, before any weights are read."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from depthbench.calibration.activations import auto_budget
from depthbench.calibration.strategy import STRATEGIES
from depthbench.errors import ConfigError


@dataclass(frozen=True)
class CacheSettings:
    """Every key of ``cache`` in conf/config.yaml, typed; the YAML holds the defaults (no fallbacks here)."""

    dir: str | None
    statistics: bool
    base_results: bool
    activations_gb: str | float
    lock_stale_s: float
    keep_activations: bool
    activation_strategy: str

    @classmethod
    def from_config(cls, node: DictConfig | dict) -> "CacheSettings":
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        missing = [key for key in cls.__dataclass_fields__ if key not in values]
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if missing or unknown:
            raise ConfigError(f"cache: missing {missing} / unknown {unknown} keys; allowed: "
                              f"{', '.join(cls.__dataclass_fields__)}")
        gb = values["activations_gb"]
        if gb != "auto" and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or not 0 <= gb < float("inf")):
            raise ConfigError(f"cache.activations_gb={gb!r}; allowed: auto, or a number of GiB >= 0 (0 = do not "
                              f"store activations)")
        stale = values["lock_stale_s"]
        if isinstance(stale, bool) or not isinstance(stale, (int, float)) or not 0 < stale < float("inf"):
            raise ConfigError(f"cache.lock_stale_s={stale!r}; allowed: a number of seconds > 0")
        for key in ("statistics", "base_results", "keep_activations"):
            if not isinstance(values[key], bool):
                raise ConfigError(f"cache.{key}={values[key]!r}; allowed: true, false")
        if values["activation_strategy"] not in STRATEGIES:
            raise ConfigError(f"cache.activation_strategy={values['activation_strategy']!r}; allowed: "
                              f"{', '.join(STRATEGIES)}")
        return cls(dir=values["dir"], statistics=values["statistics"], base_results=values["base_results"],
                   activations_gb=gb, lock_stale_s=float(stale), keep_activations=values["keep_activations"],
                   activation_strategy=values["activation_strategy"])

    def activation_budget(self, store_dir: Path | None = None) -> int:
        """The disk space (bytes) one model's stored calibration activations may take: 0 = never store them;
        ``auto`` = `auto_budget` of the file system of ``store_dir`` (default: the temporary directory single
        runs use)."""
        if self.activations_gb == "auto":
            return auto_budget(store_dir if store_dir is not None else tempfile.gettempdir())
        return int(self.activations_gb * 1024**3)

"""Every path depthbench reads or writes, from one place: the config group ``paths`` (conf/paths/).

- ``paths.cache_dir``: the user cache (``null``: ``$DEPTHBENCH_CACHE``, else ``~/.cache/depthbench``):
  converted copies of packaged models (``models/``), local copies of benchmark data, and the shared
  caches of single runs;
- ``paths.output_dir``: runs (``runs/<time>``) and sweeps (``sweeps/<name>``), used by the Hydra tree;
- the shared caches of a cell (calibration statistics, stored activations, base-model results):
  ``cache.dir`` when set, else the sweep's ``.cache`` (shared by its cells), else ``paths.cache_dir``.

Library callers without a config get the same defaults from `user_cache_dir`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def user_cache_dir() -> Path:
    """``$DEPTHBENCH_CACHE``, else ``~/.cache/depthbench``."""
    return Path(os.environ.get("DEPTHBENCH_CACHE", Path.home() / ".cache" / "depthbench"))


@dataclass(frozen=True)
class RunPaths:
    """The paths of one run (see the module docstring)."""

    cache_dir: Path
    output_dir: Path
    #: ``cache.dir``: an explicit shared cache for statistics and base results (None: derived).
    shared_cache_dir: Path | None = None

    @property
    def models_dir(self) -> Path:
        """Converted copies of packaged models."""
        return self.cache_dir / "models"

    @property
    def data_dir(self) -> Path:
        """Local copies of benchmark data (lm-eval task data)."""
        return self.cache_dir

    def shared_cache(self, sweep_dir: Path | None) -> Path:
        """Calibration statistics and base-model results: ``cache.dir``, else the sweep's ``.cache``,
        else the user cache."""
        if self.shared_cache_dir is not None:
            return self.shared_cache_dir
        return Path(sweep_dir) / ".cache" if sweep_dir else self.cache_dir

    def statistics_dir(self, sweep_dir: Path | None) -> Path:
        """Calibration statistics and stored activations (under `shared_cache`)."""
        return self.shared_cache(sweep_dir) / "statistics"


def run_paths(cfg) -> RunPaths:
    """The `RunPaths` of a composed config (its ``paths`` group and ``cache.dir``; defaults where absent)."""
    paths = cfg.get("paths") or {}
    cache = cfg.get("cache") or {}
    cache_dir = paths.get("cache_dir")
    shared = cache.get("dir")
    return RunPaths(cache_dir=Path(str(cache_dir)).expanduser() if cache_dir else user_cache_dir(),
                    output_dir=Path(str(paths.get("output_dir") or "outputs")),
                    shared_cache_dir=Path(str(shared)).expanduser() if shared else None)

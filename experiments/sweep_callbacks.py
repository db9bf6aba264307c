"""Hydra callbacks of a depthbench multirun.

`DropStoredActivations`: the first cell of a sweep stores every layer's calibration activations in
``<sweep>/.cache/statistics`` (GBs: 2.2 GB for SmolLM2 at 128 x 256 tokens) so that the other cells'
fits need no forward pass. Once the multirun has ended they serve nothing but a later extension of
the sweep, so they are deleted (the statistics, KBs to MBs, stay). A sweep killed before its end keeps
them for its resume. ``cache.keep_activations=true`` keeps them; an explicit ``cache.dir`` is the
user's own cache and is never touched.

With parallel launchers (joblib, submitit/SLURM) Hydra calls ``on_multirun_end`` once, in the
launching process, after every job of the sweep has returned, so no cell of this sweep still reads a
store. A calibration pass lock still held in the directory (another multirun on the same sweep
directory, still computing) keeps the stores for this time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from depthbench.calibration.activations import remove_stores
from depthbench.locking import STALE_AFTER_S, EntryLock

log = logging.getLogger(__name__)


class DropStoredActivations(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        settings = config.get("cache") or {}
        if settings.get("keep_activations") or settings.get("dir"):
            return
        from depthbench.experiments.pipeline import statistics_dir

        statistics = statistics_dir(config, Path(str(config.hydra.sweep.dir)))
        if not statistics.is_dir():
            return
        stale_after = float(settings.get("lock_stale_s") or STALE_AFTER_S)
        busy = [lock for lock in statistics.glob(".pass-*.lock")
                if EntryLock(lock, stale_after_s=stale_after).held()]
        if busy:
            log.info("kept the stored calibration activations in %s: a calibration pass is still running there "
                     "(%s)", statistics, busy[0].name)
            return
        freed = remove_stores(statistics)
        if freed:
            log.info("deleted the sweep's stored calibration activations (%.2f GB) in %s; "
                     "cache.keep_activations=true keeps them", freed / 1e9, statistics)

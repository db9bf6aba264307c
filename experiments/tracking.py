"""Experiment tracking: where a run's config, metrics and record go besides ``result.json``.

Trackers are selected by the ``logger`` config group (``none``, ``wandb``). W&B runs offline by
default (no account needed); the runs of one sweep share a group.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from depthbench.errors import ConfigError
from depthbench.registry import Registry


def flatten(record: dict, prefix: str = "", sep: str = "/") -> dict:
    """Nested dict -> flat ``{"a/b/c": value}`` with scalar leaves only."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name, sep))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


class Tracker(ABC):
    def __init__(self, **options):
        self.options = options

    @abstractmethod
    def log_run(self, record: dict, run_dir: Path, group: str, name: str) -> dict:
        """Log one run's record; return a JSON-able description (e.g. where the files are)."""


tracker_registry: Registry[type[Tracker]] = Registry("logger", base=Tracker, entry_point_group="depthbench.loggers")


@tracker_registry.register("none")
class NoTracker(Tracker):
    def log_run(self, record, run_dir, group, name):
        return {"logger": "none"}


@tracker_registry.register("wandb")
class WandbTracker(Tracker):
    MODES = ("offline", "online", "disabled")

    def __init__(self, project: str = "depthbench", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, tags: list | None = None):
        if mode not in self.MODES:
            raise ConfigError(f"logger.mode={mode!r}; allowed: {', '.join(self.MODES)}")
        super().__init__(project=project, entity=entity, mode=mode, group=group, tags=list(tags or []))

    def _init(self, run_dir: Path, group: str, name: str, config: dict, job_type: str):
        os.environ.setdefault("WANDB_SILENT", "true")  # W&B's own banner would bury the result table
        import wandb

        return wandb.init(project=self.options["project"], entity=self.options["entity"], mode=self.options["mode"],
                          group=self.options["group"] or group, name=name, job_type=job_type,
                          tags=self.options["tags"], config=config, dir=str(run_dir), reinit="finish_previous")

    def log_run(self, record, run_dir, group, name):
        run = self._init(run_dir, group, name, record.get("config", {}), job_type="prune")
        try:
            scalars = flatten({k: v for k, v in record.items() if k not in ("config", "provenance")})
            for step, loss in enumerate((record.get("healing") or {}).get("loss_curve") or [], 1):
                run.log({"healing/step": step, "healing/loss": loss})  # the curve, one point per optimiser step
            run.log(scalars)
            run.summary.update(scalars)
            import wandb

            artifact = wandb.Artifact(f"result-{record['config_hash']}", type="result")
            artifact.add_file(str(run_dir / "result.json"))
            run.log_artifact(artifact)
            return {"logger": "wandb", "mode": self.options["mode"], "run_id": run.id, "dir": str(run.dir)}
        finally:
            run.finish()

    def log_table(self, frame, run_dir: Path, group: str, name: str = "leaderboard") -> dict:
        import wandb

        run = self._init(run_dir, group, name, {}, job_type="leaderboard")
        try:
            run.log({"leaderboard": wandb.Table(dataframe=frame.reset_index(drop=True))})
            return {"logger": "wandb", "run_id": run.id, "dir": str(run.dir)}
        finally:
            run.finish()


def build_tracker(cfg) -> Tracker:
    options = {k: v for k, v in dict(cfg).items() if k != "name"}
    return tracker_registry.get(cfg.name)(**options)

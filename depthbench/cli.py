"""The ``depthbench`` console script: a Hydra app around `experiments.pipeline.run`.

User errors (`DepthbenchError`) print one line and exit with status 2; ``debug=true`` shows the
traceback instead. A run that fails that way leaves nothing behind in its run directory.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from depthbench.errors import DepthbenchError
from depthbench.report import summary_table

log = logging.getLogger("depthbench")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def app(cfg: DictConfig) -> None:
    from experiments.pipeline import run

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        record = run(cfg, output_dir)
    except DepthbenchError as err:
        if cfg.get("debug"):
            raise
        _remove_hydra_leftovers(output_dir)
        print(f"depthbench: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary_table(record))
    print(f"run directory: {output_dir}")


def _remove_hydra_leftovers(directory: Path) -> None:
    """Undo what Hydra created for a run that failed on bad input (its config copy and log), and the
    run directory itself when that leaves it empty."""
    if not directory.is_dir():
        return
    logging.shutdown()
    for name in (".hydra", f"{HydraConfig.get().job.name}.log"):
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    cwd = Path.cwd().resolve()
    current = directory.resolve()
    while current != cwd and current.is_dir() and not any(current.iterdir()) and cwd in current.parents:
        current.rmdir()
        current = current.parent


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The ``depthbench`` console script: a Hydra app around `depthbench.experiments.pipeline.run`.

User errors (`DepthbenchError`) print one line and exit with status 2; ``debug=true`` shows the
traceback instead. A run that fails that way leaves nothing behind in its run directory. A command line
that Hydra cannot compose (an unknown config or key, a mistyped value) gets the same one line
(`depthbench.composition_errors`); ``HYDRA_FULL_ERROR=1`` or ``debug=true`` shows Hydra's own report.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from depthbench.config_store import register_configs
from depthbench.errors import DepthbenchError
from depthbench.report import summary_table

log = logging.getLogger("depthbench")

# The pruner config entries (structured configs) must exist wherever Hydra composes: here, and in the
# worker processes of the joblib / submitit launchers, which import this module to run `app`.
register_configs()


@hydra.main(version_base="1.3", config_path="pkg://depthbench.conf", config_name="config")
def app(cfg: DictConfig) -> None:
    from depthbench.experiments.pipeline import run

    if not cfg.get("debug"):
        for noisy in ("lm_eval", "datasets", "transformers", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else None
    try:
        record = run(cfg, output_dir, sweep_dir=sweep_dir, group=sweep_dir.name if multirun else "single")
    except DepthbenchError as err:
        if cfg.get("debug"):
            raise
        _remove_hydra_leftovers(output_dir)
        print(f"depthbench: error: {err}", file=sys.stderr)
        sys.exit(2)
    if record.get("resumed"):
        print(f"already finished (config {record['config_hash']}); nothing redone")
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


def _unwritable_output_dir(argv: list[str]) -> str | None:
    """Hydra creates the run directory before any of our code runs and fails with a traceback if it
    cannot; check a ``hydra.run.dir`` / ``hydra.sweep.dir`` given on the command line first."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") in ("hydra.run.dir", "hydra.sweep.dir") and value:
            path = Path(value).expanduser().absolute()
            existing = next(p for p in (path, *path.parents) if p.exists())
            if not existing.is_dir():
                return f"{key}={value}: {existing} is not a directory"
            if not os.access(existing, os.W_OK | os.X_OK):
                return f"{key}={value}: {existing} is not writable"
    return None


def methods_help() -> str:
    """Every registered pruner with its paper and options (type, default, documentation)."""
    from depthbench.pruners import pruner_registry
    from depthbench.pruners.options import option_help

    lines = ["== Methods (pruner=NAME; options as pruner.options.KEY=VALUE) =="]
    for name in pruner_registry.names():
        pruner = pruner_registry.get(name)
        lines.append(f"{name}: {pruner.paper}" if pruner.paper else name)
        for key, kind, default, text in option_help(pruner.Options):
            lines.append(f"    {key} ({kind}, default {default!r}): {text}")
    from depthbench.pruners.methods.compensation import FOLDS, METHODS, MODES

    lines += ["", "== Any layer-removal method: Prune&Comp magnitude compensation (docs/METHODS.md) ==",
              f"pruner.compensate ({' | '.join(METHODS)}, default none), pruner.compensate_mode "
              f"({' | '.join(MODES)}, default iterative), pruner.compensate_fold ({' | '.join(FOLDS)}, default after)",
              "", "== After pruning: healing=none (default) | lora | lora_short | lora_long (LoRA, merged; "
              "healing.* keys in conf/healing/lora.yaml) | partial_layers (full fine-tuning of the head, final norm "
              "and last k layers; conf/healing/partial_layers.yaml) =="]
    return "\n".join(lines) + "\n"


def main() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(methods_help())
    problem = _unwritable_output_dir(sys.argv[1:])
    if problem:
        print(f"depthbench: error: output directory {problem}", file=sys.stderr)
        sys.exit(2)
    wants_full_report = os.environ.get("HYDRA_FULL_ERROR") == "1" or "debug=true" in sys.argv[1:]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its report: we print one line
    try:
        app()
    except Exception as err:
        from depthbench.composition_errors import is_composition_error, one_line

        if wants_full_report or not is_composition_error(err):
            raise
        print(f"depthbench: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

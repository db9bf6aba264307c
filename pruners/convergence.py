"""Convergence bookkeeping shared by the trained replacements (ReplaceMe-cosine's T, LLM-Streamline's layer).

- `holdout_split`: a seeded split of calibration rows / sequences into disjoint training and held-out parts.
- `ConvergenceLog`: the training and held-out objective curves (every ``eval_every`` optimiser steps), the
  best state by held-out objective, and whether the fit ended worse than where it started (logged as a
  warning and recorded as ``worse_than_initial``).
- `training_budget`: the budget entry of a trained replacement (calibration tokens, training tokens,
  optimiser steps, epochs), the fields that make two fits' budgets comparable.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from depthbench.errors import ConfigError

log = logging.getLogger(__name__)

#: Values of the learning-rate schedule options.
SCHEDULES = ("constant", "cosine")


def check_holdout(method: str, holdout: float) -> None:
    if not (math.isfinite(holdout) and 0 <= holdout < 1):
        raise ConfigError(f"{method} holdout={holdout!r}; allowed: a fraction in [0, 1) of the calibration "
                          f"rows held out of training to measure convergence (0 = none)")


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``(train, held_out)`` of ``n`` items, disjoint and covering ``range(n)``:
    ``round(fraction * n)`` items (at least 1 where ``fraction > 0``) drawn without replacement by a
    ``numpy`` generator seeded with ``seed``; at least one item is left for training."""
    if fraction <= 0:
        return np.arange(n), np.arange(0)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise ConfigError(f"holdout={fraction!r} of {n} calibration items leaves none to train on; lower the "
                          f"holdout or use more calibration data")
    held = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    train = np.setdiff1d(np.arange(n), held)
    return train, held


def eval_interval(eval_every: int, total_steps: int, steps_per_epoch: int) -> int:
    """Optimiser steps between two evaluations: ``eval_every``, or once per epoch where it is 0."""
    return eval_every if eval_every > 0 else max(1, min(steps_per_epoch, total_steps))


@dataclass
class ConvergenceLog:
    """Objective curves of one fit and its best state by held-out objective.

    ``record(step, train, held_out, state)`` at step 0 (the initial state) and every evaluation; ``train``
    is the mean mini-batch training objective since the previous record (at step 0: the exact objective, or None
    where the method does not compute it),
    ``held_out`` the exact objective on the held-out part (None without one). ``state`` is a callable
    returning a copy of the trained state; it is only called when the state is the best so far.
    """

    what: str
    curve: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_held_out: float = math.inf
    best_state: Any = None

    def record(self, step: int, train: float | None, held_out: float | None,
               state: Callable[[], Any] | None = None) -> None:
        self.curve.append({"step": step, "train": train, "held_out": held_out})
        if held_out is not None and held_out < self.best_held_out:
            self.best_step, self.best_held_out = step, held_out
            if state is not None:
                self.best_state = copy.deepcopy(state())

    @property
    def has_held_out(self) -> bool:
        return bool(self.curve) and self.curve[0]["held_out"] is not None

    def summary(self, kept_best: bool, final_train: float | None = None) -> dict:
        """The ``convergence`` entry of a fit: curves, initial / last / best held-out objective, which
        state was kept, and ``worse_than_initial`` (the LAST state's held-out objective above the initial
        one; where nothing is held out, the exact training objective ``final_train`` of the last state, else the
        last record's), warned about in the log."""
        key = "held_out" if self.has_held_out else "train"
        if self.curve[0][key] is None:
            return {"curve": self.curve, "judged_on": None, "worse_than_initial": None,
                    "kept": "best" if kept_best else "last"}
        initial, last = self.curve[0][key], self.curve[-1][key]
        if key == "train" and final_train is not None:
            last = final_train
        worse = bool(last > initial)
        out = {"curve": self.curve, "judged_on": key, "initial": initial, "last": last,
               "worse_than_initial": worse, "kept": "best" if kept_best else "last"}
        if self.has_held_out:
            out.update(best_step=self.best_step, best_held_out=self.best_held_out)
        if worse:
            rescue = (f"; the best state (step {self.best_step}, {self.best_held_out:.6g}) is kept" if kept_best
                      else "; the last state is kept (keep_best: false)")
            log.warning("%s: the %s objective ends worse than at initialisation (%.6g -> %.6g)%s", self.what,
                        key.replace("_", "-"), initial, last, rescue)
        return out


def training_budget(calibration_tokens: int, training_tokens: int, optimizer_steps: int, epochs: float,
                    held_out_tokens: int) -> dict:
    """``budget`` of a trained replacement: tokens in the calibration data it read, tokens processed by the
    optimiser (summed over steps: repeats count), optimiser steps, passes over the training part, and the
    held-out tokens never trained on."""
    return {"calibration_tokens": int(calibration_tokens), "training_tokens": int(training_tokens),
            "optimizer_steps": int(optimizer_steps), "epochs": float(epochs),
            "held_out_tokens": int(held_out_tokens)}


def sum_budgets(budgets: list[dict]) -> dict:
    """Budgets of several fits of one prune (e.g. one per block, each on its own pass over the same calibration
    data): training tokens, steps and held-out tokens added up, calibration tokens their maximum (the data's
    size, not the passes), epochs their mean."""
    total = {key: sum(b[key] for b in budgets) for key in budgets[0]}
    total["calibration_tokens"] = max(b["calibration_tokens"] for b in budgets)
    total["epochs"] = sum(b["epochs"] for b in budgets) / len(budgets)
    return total

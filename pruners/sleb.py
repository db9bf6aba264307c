"""SLEB (Song et al., ICML 2024, arXiv 2402.09025): remove, one at a time, the layer whose removal hurts the
calibration NLL least, re-scoring the pruned model after every removal.

``A`` holds the surviving original layer indices, ascending. At step i = 0 .. R-1, every position j in
``[early_barrier, |A| - latter_barrier)`` is a candidate: ``NLL_cal`` of the model with ``A[j]`` and all
earlier removals skipped; ``A[argmin]`` goes (strict ``<``: the first minimum wins). With the reference
barriers 1 / 1, the original first and last layers are never removed. ``R(L-b_e-b_l) - R(R-1)/2``
NLL evaluations in all (``R(L-2) - R(R-1)/2`` with the default barriers).

The reference scores the total calibration NLL (mean cross-entropy x tokens): with a fixed token
count it ranks exactly as the mean per token used here (``NLL_cal``, float64 sum, padding masked).
The reference's own calibration text (WikiText-2 train rows, joined and cut into 2048-token windows)
is not available offline: SLEB runs on the calibration data of the run or sweep like every method.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from depthbench.errors import ConfigError
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.options import option

EVALUATIONS = ("tail", "full")


def candidate_nlls(service, candidates: list[int], skip: list[int], evaluation: str) -> dict[int, float]:
    """``NLL_cal(skip + [c])`` for every candidate layer: ``tail`` runs only the layers from each candidate up
    (`CalibrationService.masked_nll`), ``full`` one whole forward pass per candidate (the same numbers)."""
    if evaluation == "tail":
        return service.masked_nll(candidates, skip=skip)
    return {c: service.nll(skip=[*skip, c]) for c in candidates}


def first_argmin(keys: list, values: dict) -> object:
    """The key with the smallest value; strict ``<`` over ``keys`` in order, so the first minimum wins."""
    best = keys[0]
    for key in keys[1:]:
        if values[key] < values[best]:
            best = key
    return best


@dataclass
class NLLEvaluation:
    """The option shared by methods that score candidates by the calibration NLL with them skipped."""

    evaluation: str = option("tail", "How each candidate's NLL is computed: 'tail' runs only the layers from the "
                                     "candidate up, from the residual stream of the current model (the same numbers, "
                                     "fewer layer runs); 'full' runs one whole forward pass per candidate, as the "
                                     "reference does.")


def check_evaluation(method: str, evaluation: str) -> None:
    if evaluation not in EVALUATIONS:
        raise ConfigError(f"{method} evaluation={evaluation!r}; allowed: {', '.join(EVALUATIONS)}")


@pruner_registry.register("sleb")
class SLEBPruner(Pruner):
    name = "sleb"
    paper = ("Song et al. 2024, SLEB: Streamlining LLMs through Redundancy Verification and Elimination of "
             "Transformer Blocks (ICML 2024, arXiv 2402.09025)")

    @dataclass
    class Options(NLLEvaluation):
        early_barrier: int = option(1, "Positions at the start of the surviving layers that are never candidates "
                                       "(reference 1: the first layer is never removed).")
        latter_barrier: int = option(1, "Positions at the end of the surviving layers that are never candidates "
                                        "(reference 1: the last layer is never removed).")

    def validate_options(self) -> None:
        for key in ("early_barrier", "latter_barrier"):
            value = getattr(self.options, key)
            if value < 0:
                raise ConfigError(f"sleb {key}={value!r}; allowed: an integer >= 0")
        check_evaluation(self.name, self.options.evaluation)

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        super().check_feasible(num_layers, n_remove)
        barriers = self.options.early_barrier + self.options.latter_barrier
        if n_remove > num_layers - barriers:
            raise ConfigError(
                f"sleb cannot remove {n_remove} of {num_layers} layers with early_barrier="
                f"{self.options.early_barrier} and latter_barrier={self.options.latter_barrier}: the last step would "
                f"have {num_layers - barriers - n_remove + 1} candidates; allowed: at most {num_layers - barriers} "
                f"layers (lower the ratio or the barriers)")

    def statistics(self, adapter, n_remove):
        return []  # every score is an NLL of the model with layers skipped, asked of the service

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        self.check_feasible(adapter.num_layers, n_remove)
        alive = list(range(adapter.num_layers))
        removed: list[int] = []
        steps = []
        for _ in tqdm(range(n_remove), desc="sleb: greedy removal", unit="layer", disable=not service.progress):
            candidates = alive[self.options.early_barrier:len(alive) - self.options.latter_barrier]
            nlls = candidate_nlls(service, candidates, removed, self.options.evaluation)
            best = first_argmin(candidates, nlls)
            steps.append({"candidates": candidates, "nll": [nlls[c] for c in candidates], "removed": best})
            removed.append(best)
            alive.remove(best)
        return Selection(
            removed_layers=sorted(removed),
            scores={"metric": "NLL_cal (mean next-token NLL per calibration token) with the candidate and all "
                              "earlier removals skipped; argmin removed at each step",
                    "order": removed, "steps": steps,
                    "evaluations": sum(len(s["candidates"]) for s in steps)},
        )

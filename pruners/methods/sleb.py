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

from depthbench.errors import ConfigError
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.candidate_scoring import (EVALUATIONS, NLLEvaluation, ScoresCandidates, candidate_nlls,
                                                  check_evaluation, check_score_samples, scoring_subset)
from depthbench.pruners.options import option
from depthbench.selection.greedy import first_argmin, greedy_removal

# re-exported: these lived here before `depthbench.pruners.candidate_scoring` / `depthbench.selection.greedy`
__all__ = ["EVALUATIONS", "NLLEvaluation", "SLEBPruner", "candidate_nlls", "check_evaluation", "first_argmin"]


@pruner_registry.register("sleb")
class SLEBPruner(ScoresCandidates, Pruner):
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
        check_score_samples(self.name, self.options.score_samples)

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
        o = self.options
        scoring, scored = scoring_subset(self.name, service, o.score_samples)
        num_layers = adapter.num_layers

        def pool(removed: list[int]) -> list[int]:
            alive = [k for k in range(num_layers) if k not in removed]
            return alive[o.early_barrier:len(alive) - o.latter_barrier]

        def nlls(candidates: list[int], removed: list[int]) -> dict:
            return candidate_nlls(scoring, candidates, removed, o.evaluation)

        run = greedy_removal(pool, nlls, lambda removed: len(removed) >= n_remove, progress=service.progress,
                             total=n_remove, description="sleb: greedy removal", unit="layer")
        steps = [{"candidates": r.candidates, "nll": r.scores, "removed": best}
                 for r, best in zip(run.rounds, run.order)]
        return Selection(
            removed_layers=sorted(run.order),
            scores={"metric": "NLL_cal (mean next-token NLL per calibration token) with the candidate and all "
                              "earlier removals skipped; argmin removed at each step",
                    "order": run.order, "steps": steps, "evaluations": run.evaluations, **scored},
        )

"""BlockPruner (Zhong et al., ACL 2025 Findings, arXiv 2406.10594): greedy search over attention and MLP
sub-blocks by calibration perplexity.

Candidates are all 2L sub-blocks (attention 0..L-1, then MLP 0..L-1), no barriers. Each step scores every
remaining candidate c by ``NLL_cal(S + {c})``, the mean next-token NLL of the calibration tokens with the
sub-blocks chosen so far (S) and c skipped, and adds the argmin (strict ``<`` in candidate order: ties go
to the earlier candidate). The prefixes are nested. A skipped attention drops its pre-norm with it.

PPL = exp(NLL) ranks as NLL. The reference's NLL is the mean over equal-length 2048-token windows of the
per-window mean, which equals the per-token mean there; here it is the per-token mean (METHODS-MORE's
``NLL_cal``), the same number on packed windows (``calibration.packing=true``) and a token-weighted one on
ragged windows (see docs/METHODS.md). How many modules go: `depthbench.pruners.sub_block_budget`
(default ``budget: params``: the first prefix whose removed parameters reach those of R layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.candidate_scoring import (ScoresCandidates, ScoreSubset, check_score_samples,
                                                  scoring_subset)
from depthbench.pruners.methods.llm_drop import candidate_units
from depthbench.pruners.options import option
from depthbench.pruners.sub_block_budget import Budget, check_budget
from depthbench.selection.greedy import greedy_removal


@pruner_registry.register("blockpruner")
class BlockPrunerPruner(ScoresCandidates, Pruner):
    name = "blockpruner"
    paper = "Zhong et al. 2025, BlockPruner: Fine-grained Pruning for Large Language Models (ACL 2025 Findings)"

    @dataclass
    class Options(ScoreSubset):
        budget: str = option("params", "params (reference's reported ratio): stop at the first prefix whose removed "
                                       "parameters reach those of R layers; count: a number of sub-blocks (2R, "
                                       "or n_modules).")
        n_modules: int = option(0, "With budget=count: the number of sub-blocks to remove (the reference's "
                                   "--del-block-num; 0: 2R).")

    def removes_sub_blocks(self) -> bool:
        return True

    def validate_options(self) -> None:
        check_budget(self.name, self.options.budget, self.options.n_modules)
        check_score_samples(self.name, self.options.score_samples)

    def check_model(self, adapter) -> None:
        for part in ("attention", "mlp"):
            adapter.sub_block_stand_ins(adapter.layer(0), part)

    def statistics(self, adapter, n_remove):
        return []  # every score is an NLL of the masked model, asked of the service in `select`

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        o = self.options
        candidates = candidate_units(adapter.num_layers, "joint")
        budget = Budget(adapter, o.budget, n_remove, o.n_modules, both_kinds=True)
        budget.check_reachable(candidates)
        scoring, scored = scoring_subset(self.name, service, o.score_samples)

        def nlls(remaining, chosen):
            return scoring.masked_nll(remaining, skip=chosen, what=f"blockpruner step {len(chosen) + 1}")

        run = greedy_removal(lambda chosen: candidates, nlls, budget.done, progress=False)
        steps = [{"removed": str(best), "nll": r.score_of(best),
                  "candidates": {str(u): value for u, value in zip(r.candidates, r.scores)}}
                 for r, best in zip(run.rounds, run.order)]
        scores = {"metric": "calibration NLL per token with the chosen sub-blocks and the candidate skipped "
                            "(PPL = exp(NLL))",
                  "removed_in_order": [str(u) for u in run.order], "steps": steps,
                  "evaluations": run.evaluations, **budget.describe(), **scored}
        return Selection.from_units(run.order, scores=scores)

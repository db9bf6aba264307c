"""FinerCut (Zhang et al. 2024, arXiv 2405.18218): greedy removal of attention and MLP sub-blocks by how far
the pruned model's output distribution moves from the dense model's.

Candidates are the attention and the MLP sub-block of every layer (units ``K.attn`` / ``K.mlp``, attention
0..L-1 then MLP 0..L-1; the reference masks the output of ``o_proj`` / ``down_proj``, the same function as
skipping the sub-block). The objective of a set S of removed sub-blocks is

    D(S) = mean over every real calibration position of d(P_dense, Q_S)

with P_dense / Q_S the next-token distributions of the dense model and of the model without S at that
position (no label shift; padding masked; float64 sums), and d (``divergence``):

- ``js_ref`` (default, the reference's ``js_divergence``): ``1/2 [KL(M || P) + KL(M || Q)]``, M = (P + Q) / 2;
  the reference's ``reduction="mean"`` also divides by the vocabulary size V: D / V is recorded as the
  reference's number beside D;
- ``js``: the true Jensen-Shannon divergence ``1/2 [KL(P || M) + KL(Q || M)]``;
- ``kl``: ``KL(P || Q)``;
- ``ppl``: the calibration NLL with S skipped instead (the reference's Llama-2 configs score perplexity).

``mode: greedy`` (reference): every step scores each remaining candidate c by ``D(S + {c})`` against the same
dense model and takes the first minimum (`depthbench.selection.greedy`). ``mode: one_shot`` (the reference's
``loss_one_shot``) scores the candidates once and takes them in ascending order, re-scoring only the withheld
front once the first pool is used up.

Front exclusion (``exclude_front`` x, reference 0.4): both sub-blocks of layers ``0 .. int(2L x / 2)`` are
withheld until ``int(2L x) + 1`` sub-blocks are removed; both expressions are evaluated in Python floats as
written, so x = 0 still withholds layer 0 for the first pick (`candidate_pool`).

Budget: ``count`` (reference) removes K sub-blocks, ``n_modules`` when given (the reference's K =
int(r 2L)), else 2R for the pipeline's R = round(r L) layers (`depthbench.pruners.sub_block_budget`);
``params``: the first prefix whose removed parameters reach those of R layers. Candidates are scored on the
first ``score_samples`` calibration sequences (default 10, the reference's 10 windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from depthbench.calibration.divergence import DIVERGENCES
from depthbench.errors import ConfigError
from depthbench.modeling.units import Unit
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.candidate_scoring import (ScoresCandidates, ScoreSubset, check_score_samples,
                                                  score_samples_option, scoring_subset)
from depthbench.pruners.methods.llm_drop import candidate_units
from depthbench.pruners.options import option
from depthbench.pruners.sub_block_budget import Budget, check_budget, module_count, removed_parameters
from depthbench.selection.greedy import greedy_removal, ranked_removal

OBJECTIVES = (*DIVERGENCES, "ppl")
MODES = ("greedy", "one_shot")


def last_withheld_layer(num_layers: int, exclude_front: float) -> int:
    """The last layer whose two sub-blocks are withheld at first: ``int(2L x / 2)`` (the reference's
    ``int(len(targets) * rate / 2)``, as written)."""
    return int(2 * num_layers * exclude_front / 2)


def rejoin_after(num_layers: int, exclude_front: float) -> int:
    """How many sub-blocks must be removed before the withheld ones rejoin: ``int(2L x) + 1``."""
    return int(2 * num_layers * exclude_front) + 1


def candidate_pool(candidates: list[Unit], num_layers: int, exclude_front: float, n_removed: int) -> list[Unit]:
    """The candidates (in their order) that may be picked after ``n_removed`` removals."""
    if n_removed >= rejoin_after(num_layers, exclude_front):
        return list(candidates)
    last = last_withheld_layer(num_layers, exclude_front)
    return [u for u in candidates if u.layer > last]


def check_pool(num_layers: int, exclude_front: float, needs_more_than_pool) -> None:
    """`ConfigError` when the first pool runs out before the withheld sub-blocks rejoin and the budget
    (``needs_more_than_pool(pool)``: whether removing all of it does not meet the budget) asks for more."""
    pool = candidate_pool(candidate_units(num_layers, "joint"), num_layers, exclude_front, 0)
    last, rejoin = last_withheld_layer(num_layers, exclude_front), rejoin_after(num_layers, exclude_front)
    if len(pool) < rejoin and needs_more_than_pool(pool):
        raise ConfigError(
            f"finercut exclude_front={exclude_front} withholds both sub-blocks of layers 0..{last} of {num_layers} "
            f"until {rejoin} are removed, but only {len(pool)} other sub-blocks exist and the budget needs more; "
            f"allowed: a smaller exclude_front or ratio")


@pruner_registry.register("finercut")
class FinerCutPruner(ScoresCandidates, Pruner):
    name = "finercut"
    paper = ("Zhang et al. 2024, FinerCut: Finer-grained Interpretable Layer Pruning for Large Language Models "
             "(arXiv 2405.18218)")

    @dataclass
    class Options(ScoreSubset):
        divergence: str = option("js_ref", "The objective d(P_dense, Q_S) per position: js_ref (reference: "
                                           "1/2[KL(M||P)+KL(M||Q)], M=(P+Q)/2), js (true Jensen-Shannon), kl "
                                           "(KL(P||Q)), or ppl (the calibration NLL instead).")
        mode: str = option("greedy", "greedy (reference): re-score every remaining candidate after each removal; "
                                     "one_shot: score once, remove in ascending order.")
        exclude_front: float = option(0.4, "Both sub-blocks of layers 0..int(2L*x/2) are withheld until "
                                           "int(2L*x)+1 sub-blocks are removed (reference -x 0.4; 0 still withholds "
                                           "layer 0 for the first pick).")
        budget: str = option("count", "count (reference): K sub-blocks, n_modules or 2R; params: stop at the first "
                                      "prefix whose removed parameters reach those of R layers.")
        n_modules: int = option(0, "With budget=count: the number K of sub-blocks to remove (the reference's "
                                   "int(r*2L), e.g. 15 for SmolLM2 at r=0.25; 0: 2R from the pipeline's R).")
        score_samples: int = score_samples_option(10)

    def removes_sub_blocks(self) -> bool:
        return True

    def validate_options(self) -> None:
        o = self.options
        if o.divergence not in OBJECTIVES:
            raise ConfigError(f"finercut divergence={o.divergence!r}; allowed: {', '.join(OBJECTIVES)}")
        if o.mode not in MODES:
            raise ConfigError(f"finercut mode={o.mode!r}; allowed: {', '.join(MODES)}")
        if not (math.isfinite(o.exclude_front) and 0 <= o.exclude_front < 1):
            raise ConfigError(f"finercut exclude_front={o.exclude_front!r}; allowed: 0 <= exclude_front < 1")
        check_budget(self.name, o.budget, o.n_modules)
        check_score_samples(self.name, o.score_samples)

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        super().check_feasible(num_layers, n_remove)
        o = self.options
        if o.budget == "count":
            count = module_count(n_remove, o.n_modules, both_kinds=True)
            check_pool(num_layers, o.exclude_front, lambda pool: count > len(pool))

    def check_model(self, adapter) -> None:
        super().check_model(adapter)
        for part in ("attention", "mlp"):
            adapter.sub_block_stand_ins(adapter.layer(0), part)

    def statistics(self, adapter, n_remove):
        return []  # every score compares the masked model with the dense one, asked of the service in `select`

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        o = self.options
        num_layers = adapter.num_layers
        candidates = candidate_units(num_layers, "joint")
        budget = Budget(adapter, o.budget, n_remove, o.n_modules, both_kinds=True)
        budget.check_reachable(candidates)
        check_pool(num_layers, o.exclude_front, lambda pool: not budget.done(pool))
        scoring, scored = scoring_subset(self.name, service, o.score_samples)

        def pool(chosen: list[Unit]) -> list[Unit]:
            return candidate_pool(candidates, num_layers, o.exclude_front, len(chosen))

        def objective(remaining: list[Unit], chosen: list[Unit]) -> dict:
            what = f"finercut step {len(chosen) + 1}"
            if o.divergence == "ppl":
                return scoring.masked_nll(remaining, skip=chosen, what=what)
            return scoring.masked_divergence(remaining, skip=chosen, divergence=o.divergence, what=what)

        removal = greedy_removal if o.mode == "greedy" else ranked_removal
        run = removal(pool, objective, budget.done, progress=service.progress,
                      total=budget.count if o.budget == "count" else None, description="finercut: sub-blocks",
                      unit="sub-block")
        return Selection.from_units(run.order, scores=self.record(run, adapter, budget, scored))

    def record(self, run, adapter, budget: Budget, scored: dict) -> dict:
        """The selection's scores: each removal's score as its round computed it (greedy: D of the prefix up
        to it; one_shot: D of its round's prefix and it), D / V where d is a divergence, each scoring round's
        candidates, the evaluations, the budget and what was scored. ``D`` (the final set's objective) is known
        only in greedy mode, where the last step computed it."""
        o = self.options
        vocabulary = int(adapter.lm_head().weight.shape[0])

        def per_vocab(d: float | None) -> float | None:
            return None if d is None or o.divergence == "ppl" else d / vocabulary

        steps = [{"removed": str(unit), "D": run.score_of_choice(i), "D_over_V": per_vocab(run.score_of_choice(i)),
                  "round": run.chosen_in_round[i]} for i, unit in enumerate(run.order)]
        rounds = [{"removed_before": [str(u) for u in r.chosen_before],
                   "candidates": {str(u): value for u, value in zip(r.candidates, r.scores)}} for r in run.rounds]
        metric = (f"D(S) = mean over real calibration positions of {o.divergence}(P_dense, Q_S); D_over_V = D / "
                  f"vocabulary size (the reference's reduction='mean')")
        if o.divergence == "ppl":
            metric = "calibration NLL per token with the chosen sub-blocks and the candidate skipped"
        final = steps[-1]["D"] if o.mode == "greedy" else None
        return {"metric": metric, "divergence": o.divergence, "mode": o.mode, "vocabulary": vocabulary,
                "removed_in_order": [str(u) for u in run.order], "D": final, "D_over_V": per_vocab(final),
                "steps": steps, "rounds": rounds, "evaluations": run.evaluations,
                "exclude_front": {"x": o.exclude_front, "last_withheld_layer": last_withheld_layer(
                    adapter.num_layers, o.exclude_front), "rejoin_after": rejoin_after(adapter.num_layers,
                                                                                       o.exclude_front)},
                "removed_parameters": removed_parameters(adapter, run.order), **budget.describe(), **scored}

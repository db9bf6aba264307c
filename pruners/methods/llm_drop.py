"""LLM-Drop (He et al., "What Matters in Transformers? Not All Attention is Needed", arXiv 2406.15786).

Drops attention and/or MLP sub-blocks (not whole layers) whose output changes the residual stream least,
over ALL real tokens (float64):

- attention k: ``S_k = 1 - mean cos(h_k, Y_k)`` (``Y_k``: the stream after the attention residual add);
- MLP k: ``S_k = 1 - mean cos(Y_k, h_{k+1})``;
- ``drop_norm: false`` (reference option): ``1 - mean cos(norm(x), module(norm(x)))``, the sub-block's
  normalised input against its module's raw output.

One shot (reference default): drop the modules with the highest mean cosine (lowest ``S``), no barriers;
``target: joint`` ranks the 2L scores together (index i < L: attention of layer i, i >= L: MLP of layer
i - L). ``iterative: true`` drops one module per round and re-scores the pruned model (one pass per
round). How many modules go: `depthbench.pruners.sub_block_budget` (default ``budget: count``).
"""

from __future__ import annotations

from dataclasses import dataclass

from depthbench.calibration.statistics import SubBlockSimilarity
from depthbench.errors import ConfigError
from depthbench.modeling.units import Unit, normalize_units
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.options import option
from depthbench.pruners.sub_block_budget import Budget, check_budget

TARGETS = ("attn", "mlp", "joint")


def candidate_units(num_layers: int, target: str) -> list[Unit]:
    """The candidates in the reference's index order: attention 0..L-1, then (``joint``) MLP 0..L-1."""
    attention = [Unit(k, "attention") for k in range(num_layers)]
    mlp = [Unit(k, "mlp") for k in range(num_layers)]
    return {"attn": attention, "mlp": mlp, "joint": attention + mlp}[target]


def similarity_by_unit(statistic: SubBlockSimilarity, layers: list[int]) -> dict[Unit, float]:
    """Mean cosine of every sub-block, keyed by its unit; ``layers[j]`` is the original index of the
    statistic's layer j (the model a pass ran on may have whole layers skipped)."""
    attention, mlp = statistic.mean_cosine()
    out = {Unit(layers[j], "attention"): float(c) for j, c in enumerate(attention)}
    out.update({Unit(layers[j], "mlp"): float(c) for j, c in enumerate(mlp)})
    return out


def rank_by_similarity(similarity: dict[Unit, float], candidates: list[Unit]) -> list[Unit]:
    """Candidates by decreasing cosine (= increasing score 1 - cos); ties to the lower candidate index."""
    order = {u: i for i, u in enumerate(candidates)}
    return sorted(candidates, key=lambda u: (-similarity[u], order[u]))


@pruner_registry.register("llm_drop")
class LLMDropPruner(Pruner):
    name = "llm_drop"
    paper = "He et al. 2024, What Matters in Transformers? Not All Attention is Needed (arXiv 2406.15786)"

    @dataclass
    class Options:
        target: str = option("attn", "Which sub-blocks may go: attn, mlp, or joint (both kinds ranked together; "
                                     "reference default attn).")
        drop_norm: bool = option(True, "true (reference default): 1 - cos between the stream before and after the "
                                       "sub-block's residual add (h_k vs Y_k, Y_k vs h_{k+1}); false: between the "
                                       "sub-block's normalised input and its module's raw output.")
        iterative: bool = option(False, "Drop one module per round and re-score the pruned model (one calibration "
                                        "pass per round); false: one shot (reference default).")
        budget: str = option("count", "count (reference): a number of modules, R for attn/mlp and 2R for joint, "
                                      "or n_modules; params: modules in score order until the removed parameters "
                                      "reach those of R layers.")
        n_modules: int = option(0, "With budget=count: the number of modules to drop (0: from the ratio as "
                                   "above; the reference's joint count round(r*2L) can differ from 2R by one).")

    #: Layer-wise (``model.layerwise=true``) in the one-shot mode: the scores come from the one pass over the
    #: original model and removal only swaps in stand-ins (saved as zeros); ``iterative: true`` re-scores the
    #: model with the dropped sub-blocks skipped, which needs it whole, and is refused.
    supports_layerwise = True

    def removes_sub_blocks(self) -> bool:
        return True

    def check_layerwise_options(self) -> None:
        if self.options.iterative:
            raise ConfigError("llm_drop iterative=true re-scores the model with the dropped sub-blocks skipped after "
                              "every round, which needs the whole model in memory; with model.layerwise=true "
                              "allowed: iterative=false (one shot, the reference default)")

    def validate_options(self) -> None:
        o = self.options
        if o.target not in TARGETS:
            raise ConfigError(f"pruner 'llm_drop' option target={o.target!r}; allowed: {', '.join(TARGETS)}")
        check_budget(self.name, o.budget, o.n_modules)

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        super().check_feasible(num_layers, n_remove)
        o = self.options
        if o.budget == "count":
            count = o.n_modules or (2 * n_remove if o.target == "joint" else n_remove)
            limit = 2 * num_layers - 1 if o.target == "joint" else num_layers
            if count > limit:
                raise ConfigError(f"llm_drop: cannot drop {count} modules with target={o.target} of a "
                                  f"{num_layers}-layer model (at most {limit})")

    def check_model(self, adapter) -> None:
        """Sub-blocks must be units of this family (and observable from inside for ``drop_norm: false``)."""
        layer = adapter.layer(0)
        for part in ("attention", "mlp"):
            adapter.sub_block_stand_ins(layer, part)
            if not self.options.drop_norm:
                norm, module = adapter.sub_block_norm_and_module(layer, part)
                if norm is None or module is None:
                    raise ConfigError(f"llm_drop drop_norm=false: the {adapter.family} {part} sub-block has no own "
                                      f"pre-norm and single module; use drop_norm=true")

    def statistics(self, adapter, n_remove):
        return [SubBlockSimilarity(adapter.num_layers, self.options.drop_norm)]

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        o = self.options
        num_layers = adapter.num_layers
        candidates = candidate_units(num_layers, o.target)
        budget = Budget(adapter, o.budget, n_remove, o.n_modules, both_kinds=o.target == "joint")
        budget.check_reachable(candidates)
        (stat,) = [s for s in statistics if isinstance(s, SubBlockSimilarity)]
        first = similarity = similarity_by_unit(stat, list(range(num_layers)))
        rounds = []
        if not o.iterative:
            dropped = budget.take(rank_by_similarity(similarity, candidates))
        else:
            dropped = []
            while not budget.done(dropped):
                if rounds:  # round 0 scores the original model (the shared pass)
                    similarity = self._rescore(adapter, service, dropped, len(rounds))
                remaining = [u for u in candidates if u not in dropped]
                pick = rank_by_similarity(similarity, remaining)[0]
                rounds.append({"dropped": str(pick), "score": 1.0 - similarity[pick],
                               "scores": [1.0 - similarity[u] if u in remaining else None for u in candidates]})
                dropped.append(pick)
        scores = {
            "metric": ("1 - mean over all tokens of cos(h_k, Y_k) (attention) / cos(Y_k, h_{k+1}) (MLP)"
                       if o.drop_norm else "1 - mean over all tokens of cos(norm(x), module(norm(x)))"),
            "units": [str(u) for u in candidates],
            "values": [1.0 - first[u] for u in candidates],
            "dropped_in_order": [str(u) for u in dropped],
            **budget.describe(),
        }
        if rounds:
            scores["rounds"] = rounds
        return Selection.from_units(dropped, scores=scores)

    def _rescore(self, adapter, service, dropped: list[Unit], round_index: int) -> dict[Unit, float]:
        """Mean cosines of the model with ``dropped`` skipped (one pass), keyed by original units."""
        skip = normalize_units(dropped)
        gone = {u.layer for u in skip if u.is_layer}
        kept_layers = [k for k in range(adapter.num_layers) if k not in gone]
        (stat,) = service.current([SubBlockSimilarity(len(kept_layers), self.options.drop_norm)],
                                  f"llm_drop round {round_index + 1}", skip=skip)
        return similarity_by_unit(stat, kept_layers)

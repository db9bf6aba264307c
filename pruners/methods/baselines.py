"""Statistics-free baselines (Lu et al. 2024, "Reassessing Layer Pruning in LLMs", reference ``prune_llm.py``).

- ``last_layers`` (the paper's *reverse-order*): remove the last R layers, ``[L-R, L)``, layer L-1 included
  (the final norm and ``lm_head`` stay). ``keep_last: true`` removes ``[L-1-R, L-1)`` instead, keeping the
  final layer (Gromov et al.'s heuristic).
- ``random_layers``: the kept layers are ``sorted(random.sample(list(range(L)), L-R))`` after
  ``random.seed(seed)``, as the reference draws them; the removed set is the complement. The draw uses a
  private ``random.Random(seed)`` (same Mersenne Twister seeding, hence the same sets) so the global random
  state is left alone.

Neither reads calibration data: no statistics, no forward pass. Both use depthbench's public pruner
interface only, as a third-party plugin would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from depthbench.pruners import Pruner, Selection, option, pruner_registry


def last_layer_indices(num_layers: int, n_remove: int, keep_last: bool = False) -> list[int]:
    """``[L-R, L)``, or ``[L-1-R, L-1)`` with ``keep_last``."""
    end = num_layers - 1 if keep_last else num_layers
    return list(range(end - n_remove, end))


def random_layer_indices(num_layers: int, n_remove: int, seed: int) -> list[int]:
    """The complement of the reference's kept set ``sorted(random.sample(list(range(L)), L-R))`` after
    ``random.seed(seed)``, drawn from a private generator."""
    kept = set(random.Random(seed).sample(list(range(num_layers)), num_layers - n_remove))
    return [k for k in range(num_layers) if k not in kept]


class StatisticsFreePruner(Pruner):
    """A method that chooses layers without looking at the model's activations."""

    uses_calibration = False

    def statistics(self, adapter, n_remove):
        return []


@pruner_registry.register("last_layers")
class LastLayersPruner(StatisticsFreePruner):
    name = "last_layers"
    paper = "Lu et al. 2024, Reassessing Layer Pruning in LLMs: New Insights and Methods (arXiv 2411.15558)"

    @dataclass
    class Options:
        keep_last: bool = option(False, "false = remove [L-R, L), the final layer included (reference); "
                                        "true = remove [L-1-R, L-1), keeping the final layer (Gromov et al.'s "
                                        "heuristic).")

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        layers = last_layer_indices(adapter.num_layers, n_remove, self.options.keep_last)
        return Selection(removed_layers=layers,
                         scores={"metric": "none (position)", "keep_last": self.options.keep_last})


@pruner_registry.register("random_layers")
class RandomLayersPruner(StatisticsFreePruner):
    name = "random_layers"
    paper = "Lu et al. 2024, Reassessing Layer Pruning in LLMs: New Insights and Methods (arXiv 2411.15558)"

    @dataclass
    class Options:
        seed: int = option(42, "Seed of the layer draw (reference default 42); a sweep over several seeds "
                               "(pruner.options.seed=1,2,3) is aggregated into mean and std by the leaderboard.")

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        layers = random_layer_indices(adapter.num_layers, n_remove, self.options.seed)
        return Selection(removed_layers=layers, scores={"metric": "none (random draw)", "seed": self.options.seed})

"""Example plugin: a seeded random-layer baseline behind depthbench's `Pruner` interface.

    pip install ./examples/random_pruner
    depthbench pruner=random_layers pruner.options.seed=1
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from depthbench.pruners import Pruner, Selection, option


class RandomLayersPruner(Pruner):
    name = "random_layers"
    paper = "baseline: uniformly random layers"

    @dataclass
    class Options:
        seed: int = option(0, "Seed of Python's random.Random choosing the layers.")

    def statistics(self, adapter, n_remove):
        return []  # needs no calibration statistics

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        layers = sorted(random.Random(self.options.seed).sample(range(adapter.num_layers), n_remove))
        return Selection(removed_layers=layers, scores={"metric": "none (random)", "seed": self.options.seed})

"""Example plugin: a seeded random-layer pruner behind depthbench's `Pruner` interface.

    pip install ./examples/random_pruner
    depthbench pruner=example_random pruner.options.seed=1

It draws the removed layers directly (``random.Random(seed).sample(range(L), R)``); depthbench's own
baseline ``random_layers`` instead reproduces the reference draw of Lu et al. (it samples the kept layers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from depthbench.pruners import Pruner, Selection, option


class ExampleRandomPruner(Pruner):
    name = "example_random"
    paper = "example plugin: uniformly random layers"

    @dataclass
    class Options:
        seed: int = option(0, "Seed of Python's random.Random choosing the layers.")

    def statistics(self, adapter, n_remove):
        return []  # needs no calibration statistics

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        layers = sorted(random.Random(self.options.seed).sample(range(adapter.num_layers), n_remove))
        return Selection(removed_layers=layers, scores={"metric": "none (random)", "seed": self.options.seed})

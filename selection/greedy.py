"""Iterative removal loops over candidate units scored by the model with a prefix of choices removed.

SLEB, BlockPruner and FinerCut share one shape: at every step, score each remaining candidate ``c`` by the
model with the chosen prefix ``S`` and ``c`` removed, take the first minimum (strict ``<`` in candidate
order: ties go to the earlier candidate), and stop when the method's budget says so. The prefixes nest, so
one run gives the choice for every smaller budget. Which candidates a step sees (barriers, a withheld front)
and what a score is (a calibration NLL, a divergence from the dense model) belong to the method: the loop
receives them as functions, and records every step and the number of evaluations (one per candidate score).

`ranked_removal` is the one-shot variant: a round scores its candidates once and they are taken in
ascending order of that round's scores; a new round (with the prefix removed) starts only when the round's
candidates are used up and the budget still asks for more.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from depthbench.errors import ConfigError

#: ``pool(chosen)``: the candidates of the next step given the choices so far, in candidate order.
Pool = Callable[[list], Sequence[Hashable]]
#: ``score(candidates, chosen)``: ``{candidate: score}`` of the model with ``chosen`` and the candidate removed.
Score = Callable[[list, list], dict]
#: ``done(chosen)``: whether the budget is met.
Done = Callable[[list], bool]


def first_argmin(keys: Sequence, values: dict) -> object:
    """The key with the smallest value; strict ``<`` over ``keys`` in order, so the first minimum wins."""
    best = keys[0]
    for key in keys[1:]:
        if values[key] < values[best]:
            best = key
    return best


@dataclass
class Round:
    """One scoring of ``candidates`` (in candidate order) given the prefix ``chosen_before``."""

    candidates: list
    scores: list[float]
    chosen_before: list

    def score_of(self, candidate) -> float:
        return self.scores[self.candidates.index(candidate)]


@dataclass
class Removal:
    """The choices in order, the scoring rounds behind them (a greedy run: one round per choice, ``rounds[i]``
    chose ``order[i]``), and which round chose each candidate."""

    order: list = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    chosen_in_round: list[int] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        """Candidate scores computed: one masked evaluation each."""
        return sum(len(r.candidates) for r in self.rounds)

    def score_of_choice(self, i: int) -> float:
        """The score of the model with ``order[:i+1]`` removed, as computed when ``order[i]`` was chosen (a
        one-shot round scores ``order[i]`` against its own round's prefix)."""
        return self.rounds[self.chosen_in_round[i]].score_of(self.order[i])


def _next_pool(pool: Pool, chosen: list) -> list:
    candidates = [c for c in pool(list(chosen)) if c not in chosen]
    if not candidates:
        raise ConfigError(f"no candidate left after {len(chosen)} removals, but the budget asks for more")
    return candidates


def _bar(progress: bool, total: int | None, description: str, unit: str):
    return tqdm(total=total, desc=description, unit=unit, disable=not progress)


def greedy_removal(pool: Pool, score: Score, done: Done, *, progress: bool = True, total: int | None = None,
                   description: str = "greedy removal", unit: str = "unit") -> Removal:
    """Iterative greedy: every step scores every candidate of ``pool(chosen)`` with ``score`` and takes the
    first minimum, until ``done(chosen)``. ``total`` (the number of steps, when known) sizes the progress bar."""
    run = Removal()
    with _bar(progress, total, description, unit) as bar:
        while not done(run.order):
            candidates = _next_pool(pool, run.order)
            values = score(candidates, list(run.order))
            best = first_argmin(candidates, values)
            run.rounds.append(Round(candidates, [float(values[c]) for c in candidates], list(run.order)))
            run.chosen_in_round.append(len(run.rounds) - 1)
            run.order.append(best)
            bar.update(1)
    return run


def ranked_removal(pool: Pool, score: Score, done: Done, *, progress: bool = True, total: int | None = None,
                   description: str = "one-shot removal", unit: str = "unit") -> Removal:
    """One shot: score the candidates of ``pool(chosen)`` once, take them in ascending order of that round's
    scores (ties in candidate order) while they are still in the pool, and score a new round (with the
    prefix removed) only when the round's candidates are used up, until ``done(chosen)``."""
    run = Removal()
    queue: list = []
    with _bar(progress, total, description, unit) as bar:
        while not done(run.order):
            allowed = set(pool(list(run.order)))
            queue = [c for c in queue if c in allowed and c not in run.order]
            if not queue:
                candidates = _next_pool(pool, run.order)
                values = score(candidates, list(run.order))
                run.rounds.append(Round(candidates, [float(values[c]) for c in candidates], list(run.order)))
                position = {c: i for i, c in enumerate(candidates)}
                queue = sorted(candidates, key=lambda c: (values[c], position[c]))
            run.order.append(queue.pop(0))
            run.chosen_in_round.append(len(run.rounds) - 1)
            bar.update(1)
    return run

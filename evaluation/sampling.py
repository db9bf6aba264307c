"""Which examples a task's ``limit`` scores: a seeded sample, stratified by the examples' source.

A task's first N examples are often not the task: HellaSwag's validation split lists its 3,243
ActivityNet contexts before its 6,799 WikiHow ones, so ``limit=200`` taken from the top never sees
WikiHow. ``benchmark.limit_sampling`` chooses:

- ``stratified`` (the default): ``sample_indices`` draws the examples without replacement with
  ``numpy.random.default_rng(benchmark.sample_seed)``, allocated to the task's sources (`stratum`) in
  proportion to their sizes (largest remainders); a task without a source field is one stratum, a
  simple random sample. The seed is part of the benchmark config, not the run seed: every model of a
  sweep, and every seed of one method, scores the same examples, so they compare example by example.
- ``first``: the first N examples, as lm-eval's own ``--limit`` does.

The chosen example indices (positions in the task's evaluation split) are recorded with the results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from depthbench.errors import ConfigError

SAMPLING = ("stratified", "first")
DEFAULT_SAMPLING = "stratified"
DEFAULT_SEED = 0
#: Fields that name an example's source; a value ``"a~b"`` is source ``a`` (HellaSwag's ``source_id``).
SOURCE_FIELDS = ("source_id", "source")


def check_sampling(method, seed) -> tuple[str, int]:
    if method not in SAMPLING:
        raise ConfigError(f"benchmark.limit_sampling={method!r} is not allowed; use one of: {', '.join(SAMPLING)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"benchmark.sample_seed={seed!r} is not allowed; use an integer >= 0")
    return method, seed


def sample_size(limit: int | float, n: int) -> int:
    """Examples a ``limit`` asks of ``n``: an integer count, or a fraction rounded up (lm-eval's rule)."""
    return min(n, int(math.ceil(n * limit)) if limit < 1 else int(limit))


def stratum(doc) -> str:
    """An example's source: the first of `SOURCE_FIELDS` it has (up to a ``~``), else one shared stratum."""
    for name in SOURCE_FIELDS:
        value = doc.get(name) if hasattr(doc, "get") else None
        if isinstance(value, str) and value:
            return value.split("~", 1)[0]
    return ""


def allocate(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Proportional allocation of ``k`` draws to strata of these sizes, by largest remainders (ties: name)."""
    n = sum(sizes.values())
    exact = {s: k * size / n for s, size in sizes.items()}
    out = {s: int(math.floor(v)) for s, v in exact.items()}
    for s in sorted(sizes, key=lambda s: (-(exact[s] - out[s]), s))[:k - sum(out.values())]:
        out[s] += 1
    return out


def sample_indices(docs: Sequence, limit: int | float | None, method: str = DEFAULT_SAMPLING,
                   seed: int = DEFAULT_SEED) -> tuple[list[int], dict[str, int]]:
    """``(indices, drawn per stratum)``: the sorted positions of the examples to score, and how many each source
    gave (``{}`` for ``first`` or when every example is scored)."""
    n = len(docs)
    k = n if limit is None else sample_size(limit, n)
    if k >= n:
        return list(range(n)), {}
    if method == "first":
        return list(range(k)), {}
    strata: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        strata.setdefault(stratum(doc), []).append(i)
    counts = allocate({s: len(ix) for s, ix in strata.items()}, k)
    rng = np.random.default_rng(seed)
    chosen = []
    for s in sorted(strata):
        chosen += rng.choice(strata[s], size=counts[s], replace=False).tolist()
    return sorted(int(i) for i in chosen), {s: counts[s] for s in sorted(strata) if s}

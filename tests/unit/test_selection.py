import itertools
import random

import pytest

from depthbench.errors import ConfigError
from depthbench.selection.blocks import Block, best_block, greedy_blocks, lowest_layers, merge_touching


def _brute_force_greedy(scores, starts, length, count):
    ranked = sorted(zip(scores, starts))
    taken = []
    for _, s in ranked:
        layers = set(range(s, s + length))
        if all(layers.isdisjoint(range(t, t + length)) for t in taken):
            taken.append(s)
        if len(taken) == count:
            break
    return sorted(taken)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_blocks_match_brute_force(seed):
    rng = random.Random(seed)
    L, n = rng.randint(8, 20), rng.randint(1, 3)
    starts = list(range(1, L - n + 1))
    scores = [rng.random() for _ in starts]
    count = rng.randint(1, 2)
    expected = _brute_force_greedy(scores, starts, n, count)
    got = greedy_blocks(scores, starts, n, count)
    assert [b.start for b in got] == expected
    assert all(len(b) == n for b in got)


def test_best_block_is_argmin():
    assert best_block([0.3, 0.1, 0.2], [1, 2, 3], 4) == Block(2, 6)


def test_merge_touching():
    assert merge_touching([Block(5, 7), Block(1, 3), Block(3, 5), Block(9, 10)]) == [Block(1, 7), Block(9, 10)]


def test_lowest_layers_need_not_be_contiguous():
    assert lowest_layers([0.5, 0.1, 0.9, 0.05, 0.7], 2) == [1, 3]
    with pytest.raises(ConfigError):
        lowest_layers([0.1, 0.2], 2)


def test_greedy_reports_when_blocks_do_not_fit():
    with pytest.raises(ConfigError, match="num_blocks=3"):
        greedy_blocks([0.1, 0.2, 0.3], [0, 1, 2], 2, 3)


def test_every_pair_checked_for_overlap():
    for a, b in itertools.product(range(5), repeat=2):
        x, y = Block(a, a + 2), Block(b, b + 2)
        assert x.overlaps(y) == bool(set(x.layers) & set(y.layers))

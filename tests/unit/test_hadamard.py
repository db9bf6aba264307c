"""LinearPatch's rotation against the reference's: QuaRot's ``matmul_hadU`` (written out here from its
description: radix-2 butterflies down to a block of K rows, then its stored order-K matrix, / sqrt(d)) applied
to the identity, on the stored tables of orders 12, 36 and 60 (tests/data/quarot_hadamard_tables.txt)."""

import re
from pathlib import Path

import pytest
import torch

from depthbench.pruners.hadamard import HadamardRotation, paley

TABLES = Path(__file__).parents[1] / "data" / "quarot_hadamard_tables.txt"
#: The order in which the reference looks for a factor K of d with d / K a power of two.
REFERENCE_ORDER = (172, 156, 148, 140, 108, 60, 52, 36, 28, 40, 20, 12)


def reference_tables() -> dict[int, torch.Tensor]:
    tables, current = {}, None
    for line in TABLES.read_text().splitlines():
        header = re.fullmatch(r"# (\d+)", line)
        if header:
            current = tables.setdefault(int(header.group(1)), [])
        elif line and not line.startswith("#"):
            current.append([1.0 if c == "+" else -1.0 for c in line])
    return {k: torch.tensor(rows, dtype=torch.float64) for k, rows in tables.items()}


def reference_rotation(d: int, tables: dict[int, torch.Tensor]) -> torch.Tensor:
    """The reference's x -> x R for every row of the identity: R, d x d."""
    power_of_two = [k for k in REFERENCE_ORDER if d % k == 0 and not (d // k) & (d // k - 1)]
    k = power_of_two[0] if power_of_two else 1
    x = torch.eye(d, dtype=torch.float64).reshape(d, d, 1)
    while x.shape[1] > k:  # pairs of consecutive rows -> (sum, difference), widths doubling
        pairs = x.reshape(d, x.shape[1] // 2, 2, x.shape[2])
        x = torch.stack([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], dim=2)
        x = x.reshape(d, pairs.shape[1], -1)
    if k > 1:
        x = tables[k] @ x
    return x.reshape(d, d) / d ** 0.5


@pytest.mark.parametrize("d", [48, 64, 576, 960, 2048])
def test_the_rotation_equals_the_references_at_these_widths(d):
    tables = reference_tables()
    assert {k: t.shape for k, t in tables.items()} == {12: (12, 12), 36: (36, 36), 60: (60, 60)}
    expected = reference_rotation(d, tables)
    torch.testing.assert_close(expected @ expected.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(HadamardRotation(d).matrix(), expected, rtol=0, atol=1e-15)


def test_paleys_order_36_is_not_the_references_so_the_stored_table_is_used():
    """Both are Hadamard matrices of order 36, but not signed permutations of each other: the rotations they
    give at 576 differ by more than a relabelling of channels."""
    tables = reference_tables()
    ours_paley = torch.kron(paley(36), torch.ones(1, 1, dtype=torch.float64))
    overlap = (ours_paley.T @ tables[36]).abs() / 36
    assert overlap.max(dim=0).values.min() < 0.5  # a signed permutation would give 1 in every column
    assert HadamardRotation(576).name == "hadamard_had36x16"

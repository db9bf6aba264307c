"""Normalised Hadamard rotations ``R = H / sqrt(d)`` (``R R^T = I``) for LinearPatch, built from their definitions.

``H`` is ``H_K kron H_M`` with ``H_M`` Sylvester's matrix of order ``M = 2^k`` (``H_1 = [1]``,
``H_2m = [[H, H], [H, -H]]``) and ``H_K`` a Hadamard matrix of order K from Paley's constructions over a
prime field (order ``q + 1`` for a prime ``q = 3 mod 4``, order ``2(q + 1)`` for a prime ``q = 1 mod 4``),
choosing the smallest such K that divides d with a power-of-two cofactor (QuaRot's ``had_K * 2^k``
layout), except order 36, which is QuaRot's stored matrix (`HAD36`, Sloane's had.36.pal2; Paley II with
q = 17 gives another Hadamard matrix of order 36, not a signed permutation of it, so the patch would
differ from the reference's). Every ``H_K`` is checked against ``H H^T = K I`` when built.

Equal to the reference's rotation (QuaRot's ``matmul_hadU``, tested on its stored tables): d = 2^k
(Sylvester's matrix, as its fast Walsh-Hadamard transform), 12 * 2^k and 60 * 2^k (Paley I gives QuaRot's
had12 and had60 exactly), and 36 * 2^k (SmolLM2's 576 = 36 * 16). Other d with a factor K that QuaRot
stores (20, 28, 40, 52, 108, 140, 148, 156, 172) use Paley's matrix where one exists, which may differ
from the reference's table. The rotation is applied in the Kronecker form (``d (K + M)`` multiply-adds per
row instead of ``d^2``).
"""

from __future__ import annotations

import functools
import math

import torch

from depthbench.errors import ConfigError


#: QuaRot's Hadamard matrix of order 36 (its ``get_had36``: Sloane's library, had.36.pal2), row by row, + and -.
HAD36 = (
    "++++++++++++++++++-+++++++++++++++++",
    "++++-+---++---+-+++-++-+---++---+-++",
    "+++++-+---++---+-+++-++-+---++---+-+",
    "++++++-+---++---+-+++-++-+---++---+-",
    "+-+++++-+---++---++-++-++-+---++---+",
    "++-+++++-+---++---++-++-++-+---++---",
    "+-+-+++++-+---++--+-+-++-++-+---++--",
    "+--+-+++++-+---++-+--+-++-++-+---++-",
    "+---+-+++++-+---+++---+-++-++-+---++",
    "++---+-+++++-+---+++---+-++-++-+---+",
    "+++---+-+++++-+---+++---+-++-++-+---",
    "+-++---+-+++++-+--+-++---+-++-++-+--",
    "+--++---+-+++++-+-+--++---+-++-++-+-",
    "+---++---+-+++++-++---++---+-++-++-+",
    "++---++---+-+++++-++---++---+-++-++-",
    "+-+---++---+-++++++-+---++---+-++-++",
    "++-+---++---+-++++++-+---++---+-++-+",
    "+++-+---++---+-++++++-+---++---+-++-",
    "-+++++++++++++++++------------------",
    "+-++-+---++---+-++----+-+++--+++-+--",
    "++-++-+---++---+-+-----+-+++--+++-+-",
    "+++-++-+---++---+-------+-+++--+++-+",
    "+-++-++-+---++---+-+-----+-+++--+++-",
    "++-++-++-+---++-----+-----+-+++--+++",
    "+-+-++-++-+---++---+-+-----+-+++--++",
    "+--+-++-++-+---++--++-+-----+-+++--+",
    "+---+-++-++-+---++-+++-+-----+-+++--",
    "++---+-++-++-+---+--+++-+-----+-+++-",
    "+++---+-++-++-+------+++-+-----+-+++",
    "+-++---+-++-++-+---+--+++-+-----+-++",
    "+--++---+-++-++-+--++--+++-+-----+-+",
    "+---++---+-++-++-+-+++--+++-+-----+-",
    "++---++---+-++-++---+++--+++-+-----+",
    "+-+---++---+-++-++-+-+++--+++-+-----",
    "++-+---++---+-++-+--+-+++--+++-+----",
    "+++-+---++---+-++----+-+++--+++-+---",
)


def _sign_table(rows: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([[1.0 if c == "+" else -1.0 for c in row] for row in rows], dtype=torch.float64)


def sylvester(order: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``order`` (a power of two), float64 +-1."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, not {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` with chi the quadratic character mod the prime q (chi(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of ``order`` from Paley's construction I or II over a prime field, or None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + [[0, j^T], [-j, Q]]
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(order, dtype=torch.float64) + s
    if order % 2 == 0:
        q = order // 2 - 1
        if _is_prime(q) and q % 4 == 1:  # Paley II: C = [[0, j^T], [j, Q]] symmetric conference matrix
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
            plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


def _check(h: torch.Tensor, what: str) -> torch.Tensor:
    n = h.shape[0]
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype)) or not torch.equal(h.abs(), torch.ones_like(h)):
        raise AssertionError(f"{what}: H H^T != {n} I")
    return h


@functools.lru_cache(maxsize=8)
def hadamard_factors(d: int) -> tuple[torch.Tensor, int]:
    """``(H_K, M)`` with ``d = K * M``, M a power of two, ``H_K`` checked; `ConfigError` where none is known."""
    for k in range(1, d + 1):
        if d % k or (d // k) & (d // k - 1):
            continue
        if k == 1:
            h = torch.ones(1, 1, dtype=torch.float64)
        else:
            h = sylvester(k) if not k & (k - 1) else (_sign_table(HAD36) if k == 36 else paley(k))
        if h is not None:
            return _check(h, f"Hadamard matrix of order {k}"), d // k
    raise ConfigError(f"hidden size {d}: no Hadamard matrix of order {d} is constructed here (supported: 2^k, or "
                      f"K * 2^k with K = q + 1 for a prime q = 3 mod 4 or K = 2(q + 1) for a prime q = 1 mod 4); use "
                      f"pruner.options.insert_type=diag (R = I)")


class HadamardRotation:
    """``x -> x R`` with ``R = (H_K kron H_M) / sqrt(d)``, float64, in Kronecker form."""

    def __init__(self, d: int):
        self.d = d
        self.h_k, self.m = hadamard_factors(d)
        self.h_m = sylvester(self.m)
        k = self.h_k.shape[0]
        self.name = f"hadamard_{'had36' if k == 36 else f'paley{k}'}x{self.m}" if k > 1 else f"hadamard_{d}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.h_k.shape[0]
        rows = x.to(torch.float64).reshape(-1, k, self.m)
        out = torch.einsum("nab,ak,bm->nkm", rows, self.h_k.to(rows.device), self.h_m.to(rows.device))
        return out.reshape(x.shape) / math.sqrt(self.d)

    def matrix(self) -> torch.Tensor:
        """R as a dense d x d float64 matrix."""
        return torch.kron(self.h_k, self.h_m) / math.sqrt(self.d)

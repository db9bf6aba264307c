"""Per-position divergences between two next-token distributions, in float64.

``P`` is the reference (the dense model), ``Q`` the candidate, ``M = (P + Q) / 2``:

- ``kl``: ``KL(P || Q) = sum_v p (log p - log q)``;
- ``js``: the Jensen-Shannon divergence ``1/2 [KL(P || M) + KL(Q || M)]``;
- ``js_ref``: FinerCut's reference ``js_divergence``, ``1/2 [KL(M || P) + KL(M || Q)]`` (its
  ``F.kl_div(log P, M)`` computes KL(M || P)): symmetric and zero only when P = Q, but not Jensen-Shannon.

Terms with a zero weight count 0 (``0 log 0 = 0``). Distributions are computed from the logits by a float64
log-softmax, a chunk of positions at a time (`depthbench.chunks.chunk_rows`: 4 MiB per float64 temporary on a CPU,
64 MiB on a GPU), so a [positions x vocabulary] float64 array is never held for a whole batch (SmolLM2's
49,152-token vocabulary: 393 kB per position).
"""

from __future__ import annotations

import math

import torch

from depthbench.chunks import chunk_rows

DIVERGENCES = ("js_ref", "js", "kl")


def _weighted(weight_log: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_v w (a - b)`` per row, ``w = exp(weight_log)``, with 0 where ``w`` is 0."""
    w = weight_log.exp()
    return torch.where(w > 0, w * (a - b), torch.zeros_like(w)).sum(-1)


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str) -> torch.Tensor:
    """The divergence of every row (a position): ``log_p`` / ``log_q`` are float64 log-probabilities [N, V]."""
    if divergence == "kl":
        return _weighted(log_p, log_p, log_q)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    if divergence == "js":
        return 0.5 * (_weighted(log_p, log_p, log_m) + _weighted(log_q, log_q, log_m))
    if divergence == "js_ref":
        return 0.5 * (_weighted(log_m, log_m, log_p) + _weighted(log_m, log_m, log_q))
    raise ValueError(f"divergence={divergence!r}; allowed: {', '.join(DIVERGENCES)}")


def divergence_sum(reference_logits: torch.Tensor, logits: torch.Tensor, attention_mask: torch.Tensor,
                   divergence: str) -> tuple[float, int]:
    """Sum (float64) and count of the divergences of ``softmax(logits)`` from ``softmax(reference_logits)``
    at every real position (``attention_mask`` 1; no label shift: position t's own next-token distribution)."""
    vocabulary = int(logits.shape[-1])
    keep = attention_mask.to(logits.device).bool().reshape(-1)
    ref = reference_logits.to(logits.device).reshape(-1, vocabulary)
    cand = logits.reshape(-1, vocabulary)
    rows = chunk_rows(vocabulary, logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, int(cand.shape[0]), rows):
        log_p = torch.log_softmax(ref[start:start + rows].to(torch.float64), dim=-1)
        log_q = torch.log_softmax(cand[start:start + rows].to(torch.float64), dim=-1)
        per_row = divergence_rows(log_p, log_q, divergence)
        # padding rows are computed and dropped (a where, not a gather: no copy of the batch's logits)
        total += torch.where(keep[start:start + rows], per_row, torch.zeros_like(per_row)).sum()
    return float(total), int(keep.sum())

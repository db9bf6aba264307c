"""Calibration scores of the model with one more unit skipped, for many candidate units at once.

SLEB and BlockPruner score every candidate unit c by ``NLL_cal(S + {c})``: the mean next-token NLL of
the calibration tokens (float64 sum, padding masked) with the current skip set S and c skipped. FinerCut
scores it by a divergence of the candidate model's next-token distribution from the DENSE model's (nothing
skipped) at every real position (`depthbench.calibration.divergence`). Either is a `Scorer` here.
A whole forward pass per candidate re-runs every layer below c, although those layers see exactly
what they see with S alone. Here, per calibration batch:

1. the embedding output ``h_0`` is taken from the model's own forward (stopped before layer 0);
2. the residual stream of the model with S skipped is walked up layer by layer, once, with
   `ModelAdapter.layer_forward`; at each candidate's layer j it is ``h_j`` of that model;
3. each candidate at layer j is evaluated from that ``h_j``: layers j .. L-1 with S + {c} skipped
   (a skipped sub-block through `ModelAdapter.skipping`'s stand-ins, a skipped layer not run at all),
   then the final norm and the head.

So a candidate at layer j costs L - j layers and one head instead of L layers and one head, the walk
costs at most L layers per batch, and nothing is stored but the current ``h`` of one batch (no
memory budget needed: the candidates are visited in ascending layer order). The divergence scorer adds one
pass of the dense model per batch (all L layers from the same ``h_0``), whose logits every candidate of the
call is compared with: the dense distributions are never stored for the whole calibration set, only for the
batch at hand. The NLLs equal `depthbench.calibration.service.CalibrationService.nll` with ``skip=S + [c]``
(same NLL formula, same layers; the unit tests compare them in float64 on every family).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F

from depthbench.calibration.divergence import DIVERGENCES, divergence_sum
from depthbench.chunks import chunk_rows
from depthbench.modeling.units import Unit, UnitLike, as_unit


def token_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """Sum (float64) and count of the next-token NLLs whose target and context token are both real:
    the log-softmax in float32 at least (float64 logits stay float64)."""
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = chunk_rows(int(logits.shape[-1]), logits.device, torch.finfo(dtype).bits // 8)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b in range(logits.shape[0]):  # a sequence's positions are contiguous: chunks are views, not copies
        for start in range(0, logits.shape[1] - 1, rows):
            end = min(start + rows, logits.shape[1] - 1)
            nll = F.cross_entropy(logits[b, start:end].to(dtype), input_ids[b, start + 1:end + 1], reduction="none")
            total += torch.where(keep[b, start:end], nll, torch.zeros_like(nll)).to(torch.float64).sum()
    return float(total), int(keep.sum())


def checked_mean(total: float, count: int, skip, what: str = "calibration NLL") -> float:
    """``total / count``, refusing an empty or non-finite result (the message names ``skip``)."""
    if count == 0:
        raise ValueError("the calibration data has no predicted token (sequences of one token?)")
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError(f"non-finite {what} with units {[str(u) for u in skip]} skipped")
    return mean


class NLLScorer:
    """``NLL_cal``: the mean next-token NLL of the calibration tokens (`token_nll_sum`)."""

    what = "calibration NLL"

    def for_batch(self, ids: torch.Tensor, mask: torch.Tensor, dense_logits):
        return lambda logits: token_nll_sum(logits, ids.to(logits.device), mask.to(logits.device))


class DivergenceScorer:
    """The mean over every real position of a divergence (`depthbench.calibration.divergence`) of the
    candidate's next-token distribution from the dense model's. ``for_batch`` computes the dense logits of
    the batch once (``dense_logits()``: one pass of the model with nothing skipped) and compares every
    candidate of the batch with them: what the reference stores for the whole set as ``z0``, held here for
    one batch at a time."""

    def __init__(self, divergence: str):
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r}; allowed: {', '.join(DIVERGENCES)}")
        self.divergence = divergence
        self.what = f"{divergence} divergence from the dense model"

    def for_batch(self, ids: torch.Tensor, mask: torch.Tensor, dense_logits):
        reference = dense_logits()
        return lambda logits: divergence_sum(reference, logits, mask, self.divergence)


def runs_single_layers(adapter) -> bool:
    """Whether the adapter's family implements `ModelAdapter.layer_forward` (every built-in family does)."""
    from depthbench.modeling.adapters.base import ModelAdapter

    return type(adapter).layer_forward is not ModelAdapter.layer_forward


class _Stop(Exception):
    """Ends a forward pass once ``h_0`` is captured."""


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def embedding_output(adapter, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``h_0``: the input of layer 0 in the model's own forward (embeddings, positions, scaling)."""
    seen: list[torch.Tensor] = []

    def keep(h):
        seen.append(h)
        raise _Stop

    handle = adapter.observe_residual(0, keep)
    try:
        adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


class _Candidate:
    """A candidate as given, its unit, and the whole skip set S + {c} (normalised, validated)."""

    def __init__(self, key, unit: Unit, skip: list[Unit]):
        self.key, self.unit, self.skip = key, unit, skip
        self.skipped_layers = {u.layer for u in skip if u.is_layer}
        self.total, self.count = 0.0, 0


def _skipping(adapter, units: list[Unit]):
    return adapter.skipping(units) if units else contextlib.nullcontext()


def _candidates(adapter, candidates: Iterable[UnitLike], skip: Iterable[UnitLike]) -> tuple[list[Unit], dict]:
    """The skip set and ``{key: _Candidate}``, all validated before any pass (one `ConfigError`)."""
    base = adapter.check_units(skip)
    todo: dict = {}
    for key in candidates:
        if key not in todo:
            unit = as_unit(key)
            todo[key] = _Candidate(key, unit, adapter.check_units([*base, unit]))
    return base, todo


def _tail_logits(adapter, layers, order: list[_Candidate], base: list[Unit], h: torch.Tensor, mask: torch.Tensor):
    """``(candidate, logits)`` for the candidates in ascending layer order, walking the model with ``base``
    skipped up from ``h`` (= ``h_0``) once and running each candidate's tail from its own layer."""
    base_layers = {u.layer for u in base if u.is_layer}
    at = 0  # h is h_at of the model with `base` skipped
    for cand in order:
        if at < cand.unit.layer:
            with _skipping(adapter, base):
                h = _run_layers(adapter, layers, range(at, cand.unit.layer), base_layers, h, mask)
            at = cand.unit.layer
        with _skipping(adapter, cand.skip):
            tail = _run_layers(adapter, layers, range(at, len(layers)), cand.skipped_layers, h, mask)
            logits = adapter.logits_from_residual(tail)
        yield cand, logits


@torch.no_grad()
def masked_scores(adapter, batches: list[dict[str, torch.Tensor]], candidates: Iterable[UnitLike],
                  scorer, skip: Iterable[UnitLike] = (), progress: bool = True,
                  description: str = "calibration score per candidate") -> dict:
    """``{c: score(skip + [c])}`` for every candidate c (keys as given; units in the model's current
    numbering, whole layers ``K`` or sub-blocks ``"K.attn"`` / ``"K.mlp"``): the ``scorer``'s (`NLLScorer`,
    `DivergenceScorer`) float64 sum over all batches divided by its count. All units are validated before any
    pass (one `depthbench.errors.ConfigError`). A candidate already in ``skip`` gets the score of ``skip``
    itself."""
    from tqdm.auto import tqdm

    base, todo = _candidates(adapter, candidates, skip)
    if not todo:
        return {}
    order = sorted(todo.values(), key=lambda c: c.unit.layer)
    layers = list(adapter.decoder_layers())
    embed_device = adapter.embeddings().weight.device
    for batch in tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False):
        ids = batch["input_ids"].to(embed_device)
        mask = batch["attention_mask"].to(embed_device)
        h0 = embedding_output(adapter, ids, mask)
        score = scorer.for_batch(ids, mask, partial(_dense_logits, adapter, layers, h0, mask))
        for cand, logits in _tail_logits(adapter, layers, order, base, h0, mask):
            total, count = score(logits)
            cand.total += total
            cand.count += count
    return {key: checked_mean(c.total, c.count, c.skip, scorer.what) for key, c in todo.items()}


def masked_nlls(adapter, batches: list[dict[str, torch.Tensor]], candidates: Iterable[UnitLike],
                skip: Iterable[UnitLike] = (), progress: bool = True,
                description: str = "calibration NLL per candidate") -> dict:
    """``{c: NLL_cal(skip + [c])}`` for every candidate c (`masked_scores` with the `NLLScorer`)."""
    return masked_scores(adapter, batches, candidates, NLLScorer(), skip=skip, progress=progress,
                         description=description)


@torch.no_grad()
def masked_logits(adapter, batch: dict[str, torch.Tensor], candidates: Iterable[UnitLike],
                  skip: Iterable[UnitLike] = ()) -> dict:
    """``{c: logits of the model with skip + [c] skipped}`` on one batch, computed as `masked_scores`
    computes them (the walk and each candidate's tail); for checking that route."""
    base, todo = _candidates(adapter, candidates, skip)
    if not todo:
        return {}
    device = adapter.embeddings().weight.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    order = sorted(todo.values(), key=lambda c: c.unit.layer)
    layers = list(adapter.decoder_layers())
    return {cand.key: logits for cand, logits in
            _tail_logits(adapter, layers, order, base, embedding_output(adapter, ids, mask), mask)}


@torch.no_grad()
def whole_pass_scores(adapter, batches: list[dict[str, torch.Tensor]], candidates: Iterable[UnitLike],
                      scorer, skip: Iterable[UnitLike] = (), progress: bool = True,
                      description: str = "calibration score per candidate") -> dict:
    """`masked_scores` by one whole forward pass per candidate and batch (for an adapter without
    `ModelAdapter.layer_forward`); the dense logits come from a whole pass of the model as it is."""
    from tqdm.auto import tqdm

    _, todo = _candidates(adapter, candidates, skip)
    model, device = adapter.model, adapter.embeddings().weight.device
    for batch in tqdm(batches if todo else [], desc=description, unit="batch", disable=not progress, leave=False):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        score = scorer.for_batch(ids, mask, partial(_whole_pass_logits, model, ids, mask))
        for cand in todo.values():
            with _skipping(adapter, cand.skip):
                total, count = score(_whole_pass_logits(model, ids, mask))
            cand.total += total
            cand.count += count
    return {key: checked_mean(c.total, c.count, c.skip, scorer.what) for key, c in todo.items()}


def _dense_logits(adapter, layers, h0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of the model with nothing skipped, from ``h_0`` (the same layer-by-layer route as the tails)."""
    return adapter.logits_from_residual(_run_layers(adapter, layers, range(len(layers)), set(), h0, mask))


def _whole_pass_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _run_layers(adapter, layers, indices, skipped: set[int], h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    for k in indices:
        if k in skipped:
            continue
        device = _device_of(layers[k])
        h = adapter.layer_forward(layers[k], h.to(device), mask.to(device))
    return h

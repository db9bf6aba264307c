"""Calibration NLL of the model with one more unit skipped, for many candidate units at once.

SLEB and BlockPruner score every candidate unit c by ``NLL_cal(S + {c})``: the mean next-token NLL of
the calibration tokens (float64 sum, padding masked) with the current skip set S and c skipped.
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
memory budget needed: the candidates are visited in ascending layer order). The numbers equal
`depthbench.calibration.service.CalibrationService.nll` with ``skip=S + [c]`` (same NLL formula,
same layers; the unit tests compare them in float64 on every family).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from depthbench.modeling.units import Unit, UnitLike, as_unit


def token_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """Sum (float64) and count of the next-token NLLs whose target and context token are both real:
    the log-softmax in float32 at least (float64 logits stay float64)."""
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    scores = logits[:, :-1][keep].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(scores, input_ids[:, 1:][keep], reduction="none")
    return float(nll.to(torch.float64).sum()), int(keep.sum())


def checked_mean(total: float, count: int, skip) -> float:
    """``total / count``, refusing an empty or non-finite result (the message names ``skip``)."""
    if count == 0:
        raise ValueError("the calibration data has no predicted token (sequences of one token?)")
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError(f"non-finite calibration NLL with units {[str(u) for u in skip]} skipped")
    return mean


def runs_single_layers(adapter) -> bool:
    """Whether the adapter's family implements `ModelAdapter.layer_forward` (every built-in family does)."""
    from depthbench.modeling.adapters.base import ModelAdapter

    return type(adapter).layer_forward is not ModelAdapter.layer_forward


class _Stop(Exception):
    """Ends a forward pass once ``h_0`` is captured."""


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _embedding_output(adapter, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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


@torch.no_grad()
def masked_nlls(adapter, batches: list[dict[str, torch.Tensor]], candidates: Iterable[UnitLike],
                skip: Iterable[UnitLike] = (), progress: bool = True,
                description: str = "calibration NLL per candidate") -> dict:
    """``{c: NLL_cal(skip + [c])}`` for every candidate c (keys as given; units in the model's current
    numbering, whole layers ``K`` or sub-blocks ``"K.attn"`` / ``"K.mlp"``). All units are validated
    before any pass (one `depthbench.errors.ConfigError`). A candidate already in ``skip`` gets the NLL
    of ``skip`` itself."""
    from tqdm.auto import tqdm

    base = adapter.check_units(skip)
    todo: dict = {}
    for key in candidates:
        if key not in todo:
            unit = as_unit(key)
            todo[key] = _Candidate(key, unit, adapter.check_units([*base, unit]))
    if not todo:
        return {}
    order = sorted(todo.values(), key=lambda c: c.unit.layer)
    layers = list(adapter.decoder_layers())
    base_layers = {u.layer for u in base if u.is_layer}
    embed_device = adapter.embeddings().weight.device
    for batch in tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False):
        ids = batch["input_ids"].to(embed_device)
        mask = batch["attention_mask"].to(embed_device)
        h, at = _embedding_output(adapter, ids, mask), 0  # h is h_at of the model with `base` skipped
        for cand in order:
            if at < cand.unit.layer:
                with _skipping(adapter, base):
                    h = _run_layers(adapter, layers, range(at, cand.unit.layer), base_layers, h, mask)
                at = cand.unit.layer
            with _skipping(adapter, cand.skip):
                tail = _run_layers(adapter, layers, range(at, len(layers)), cand.skipped_layers, h, mask)
                logits = adapter.logits_from_residual(tail)
            total, count = token_nll_sum(logits, ids.to(logits.device), mask.to(logits.device))
            cand.total += total
            cand.count += count
    return {key: checked_mean(c.total, c.count, c.skip) for key, c in todo.items()}


def _run_layers(adapter, layers, indices, skipped: set[int], h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    for k in indices:
        if k in skipped:
            continue
        device = _device_of(layers[k])
        h = adapter.layer_forward(layers[k], h.to(device), mask.to(device))
    return h

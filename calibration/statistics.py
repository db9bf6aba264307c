"""Streaming activation statistics, all served by one forward pass over the calibration data.

Every statistic declares the hook points it needs (``h_k``: the residual stream entering layer k;
``M_k``: layer k's MLP output before the residual add; ``Y_k``: the stream after layer k's attention
residual add). `collect` hooks exactly those points, runs each batch once and hands the activations of
that batch to every statistic, which folds them into float64 running sums. Nothing grows with the number
of calibration samples, and padding positions (attention mask 0) never enter a sum.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from depthbench.errors import NumericalError

RESIDUAL = "residual"  # h_k
MLP_OUT = "mlp_out"  # M_k
ATTN_RESIDUAL = "attn_residual"  # Y_k: the stream after layer k's attention residual add
#: A sub-block seen from inside (LLM-Drop ``drop_norm: false``): its pre-norm's output, its module's output.
SUB_BLOCK_POINTS = {"attn_normed": ("attention", "normed_input"), "attn_module_out": ("attention", "output"),
                    "mlp_normed": ("mlp", "normed_input"), "mlp_module_out": ("mlp", "output")}
HookPoint = tuple[str, int]
TokenSet = Literal["all", "last"]


@dataclass
class BatchActivations:
    """One batch's captured activations; ``mask`` is True at real (non-padding) tokens."""

    points: dict[HookPoint, torch.Tensor]
    mask: torch.Tensor  # [B, T] bool
    last_index: torch.Tensor  # [B] position of each sequence's last real token

    def residual(self, k: int) -> torch.Tensor:
        return self.points[(RESIDUAL, k)]

    def mlp_out(self, k: int) -> torch.Tensor:
        return self.points[(MLP_OUT, k)]

    def attn_residual(self, k: int) -> torch.Tensor:
        return self.points[(ATTN_RESIDUAL, k)]

    def tokens(self, x: torch.Tensor, which: TokenSet) -> torch.Tensor:
        """Rows of ``x`` [B, T, d] at the chosen tokens, as float64 [N, d]."""
        if which == "last":
            rows = x[torch.arange(x.shape[0], device=x.device), self.last_index.to(x.device)]
        else:
            rows = x[self.mask.to(x.device)]
        return as_float64(rows)


def as_float64(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64; half types go through float32 (exact, and several times faster on CPU
    than torch's direct bfloat16 -> float64 conversion)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return x.to(torch.float64)


class Statistic(ABC):
    """A running float64 reduction over calibration tokens.

    Its state is its tensor attributes plus ``count``; `state` / `load_state` let the statistics
    cache store it on disk and restore it in another process.
    """

    #: Whether the statistic depends only on (model, calibration data) and may be cached on disk.
    cacheable: bool = True

    @abstractmethod
    def hook_points(self) -> set[HookPoint]:
        ...

    @abstractmethod
    def update(self, batch: BatchActivations) -> None:
        ...

    def begin_batch(self) -> None:
        """Called by `collect` before each batch's forward pass (nothing by default; a statistic that times the
        forward pass, `depthbench.calibration.strategy.DecidingWriter`, reads its clock here)."""

    @property
    def key(self) -> tuple:
        """Identifies the statistic so that equal requests from several methods are computed once."""
        return (type(self).__name__,)

    def state(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().cpu().contiguous() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        out["count"] = torch.tensor([int(getattr(self, "count", 0))], dtype=torch.int64)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            if name == "count":
                self.count = int(value[0])
                continue
            current = getattr(self, name)
            if not isinstance(current, torch.Tensor) or current.shape != value.shape:
                raise ValueError(f"cached {name} has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
            setattr(self, name, value.to(current.device, current.dtype))


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float64, clamped to [-1, 1]; zero vectors give 0."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    num = (a64 * b64).sum(-1)
    den = a64.norm(dim=-1) * b64.norm(dim=-1)
    cos = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num))
    return cos.clamp(-1, 1)


class PairwiseSimilarity(Statistic):
    """For every start s in 0..L-gap: the mean cosine and mean angular distance between h_s and h_{s+gap}.

    ``tokens="all"``: the mean runs over every real token (ShortGPT with gap 1, LLM-Streamline);
    ``tokens="last"``: over each sequence's last real token (UIDL / ReplaceMe).
    """

    def __init__(self, num_layers: int, gap: int, tokens: TokenSet):
        if not 1 <= gap <= num_layers:
            raise ValueError(f"gap {gap} must be in 1..{num_layers}")
        self.num_layers, self.gap, self.tokens = num_layers, gap, tokens
        self.starts = list(range(0, num_layers - gap + 1))
        self.sum_cos = torch.zeros(len(self.starts), dtype=torch.float64)
        self.sum_angular = torch.zeros(len(self.starts), dtype=torch.float64)
        self.count = 0

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.gap, self.tokens)

    def hook_points(self) -> set[HookPoint]:
        return {(RESIDUAL, k) for k in range(self.num_layers + 1)}

    def update(self, batch: BatchActivations) -> None:
        rows = {k: batch.tokens(batch.residual(k), self.tokens) for k in range(self.num_layers + 1)}
        for j, s in enumerate(self.starts):
            cos = cosine_rows(rows[s], rows[s + self.gap])
            self.sum_cos[j] += cos.sum().cpu()
            self.sum_angular[j] += (torch.arccos(cos) / math.pi).sum().cpu()
        self.count += next(iter(rows.values())).shape[0]

    def mean_cosine(self) -> torch.Tensor:
        return self.sum_cos / self.count

    def mean_angular_distance(self) -> torch.Tensor:
        if torch.isnan(self.sum_angular).any():
            raise ValueError(f"angular distances over {self.tokens!r} tokens are not collected (all-token tables "
                             f"carry cosine sums only)")
        return self.sum_angular / self.count

    def fill_from(self, table: "LayerSimilarityTable") -> None:
        """Take this gap's sums from a table of every layer pair (same tokens, same data)."""
        if table.tokens != self.tokens or table.num_layers != self.num_layers:
            raise ValueError("table and pairwise statistic disagree on tokens or depth")
        idx = torch.tensor(self.starts)
        self.sum_cos = table.sum_cos[idx, idx + self.gap].clone()
        self.sum_angular = table.sum_angular[idx, idx + self.gap].clone()
        self.count = table.count


class FinalNormSimilarity(Statistic):
    """The mean cosine, over every real token, between the last layer's input h_{L-1} and the model's final-norm
    output norm(h_L): what ShortGPT's official code compares for the last layer (HF's last hidden state is taken
    after the final norm). ``final_norm`` is the model's own module (`ModelAdapter.final_norm`), applied in the
    model's dtype; the cosine is float64."""

    def __init__(self, num_layers: int, final_norm):
        self.num_layers, self.final_norm = num_layers, final_norm
        self.sum_cos = torch.zeros(1, dtype=torch.float64)
        self.count = 0

    def hook_points(self) -> set[HookPoint]:
        return {(RESIDUAL, self.num_layers - 1), (RESIDUAL, self.num_layers)}

    @torch.no_grad()
    def update(self, batch: BatchActivations) -> None:
        weight = next(self.final_norm.parameters(), None)
        last = batch.residual(self.num_layers)
        if weight is not None:
            last = last.to(weight.device, weight.dtype)
        normed = batch.tokens(self.final_norm(last), "all")
        before = batch.tokens(batch.residual(self.num_layers - 1), "all")
        self.sum_cos += cosine_rows(before, normed.to(before.device)).sum().cpu()
        self.count += before.shape[0]

    def mean_cosine(self) -> float:
        return float(self.sum_cos[0] / self.count)


class LayerSimilarityTable(Statistic):
    """Sums of cos(h_k, h_l) for EVERY pair 0 <= k, l <= L at once (and, for last tokens, of the
    angular distance arccos(cos) / pi).

    One table per token set serves every block size, so a sweep over ratios and methods needs one
    pass: `PairwiseSimilarity` of any gap is a slice of it. The cosine sums need no per-token Gram:
    with ``U_k`` the unit rows of ``h_k``, ``sum_t cos(h_k(t), h_l(t)) = <vec U_k, vec U_l>``, so a
    batch costs ONE (L+1) x (L+1) matrix product of the flattened unit rows (float64). The angular
    distance is not linear in the cosine and needs per-token cosines; only UIDL / ReplaceMe rank by
    it, on last tokens (a handful per batch), so all-token tables carry the cosine sums only.
    """

    def __init__(self, num_layers: int, tokens: TokenSet):
        self.num_layers, self.tokens = num_layers, tokens
        self.sum_cos = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
        self.sum_angular = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
        if not self.has_angular:
            self.sum_angular.fill_(float("nan"))
        self.count = 0

    @property
    def has_angular(self) -> bool:
        return self.tokens == "last"

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.num_layers, self.tokens)

    def hook_points(self) -> set[HookPoint]:
        return {(RESIDUAL, k) for k in range(self.num_layers + 1)}

    #: Tokens per chunk of the flattened product: bounds the float64 working set (large fresh
    #: allocations cost page faults on every batch).
    CHUNK = 512

    def update(self, batch: BatchActivations) -> None:
        depth = self.num_layers + 1
        if self.has_angular:
            rows = torch.stack([_unit_rows(batch.tokens(batch.residual(k), self.tokens)) for k in range(depth)], 1)
            cos = (rows @ rows.transpose(1, 2)).clamp(-1, 1)  # [N, L+1, L+1]
            self.sum_cos += cos.sum(0).cpu()
            self.sum_angular += (torch.arccos(cos) / math.pi).sum(0).cpu()
            self.count += rows.shape[0]
            return
        first = batch.residual(0)
        flat_index = batch.mask.to(first.device).reshape(-1).nonzero().squeeze(1)
        width = min(self.CHUNK, flat_index.numel())
        units = torch.empty(depth, width, first.shape[-1], dtype=torch.float64, device=first.device)
        for start in range(0, flat_index.numel(), width):
            index = flat_index[start:start + width]
            part = units[:, : index.numel()]
            for k in range(depth):
                part[k] = _unit_rows(as_float64(batch.residual(k).reshape(-1, first.shape[-1])[index]))
            flat = part.reshape(depth, -1)  # [L+1, tokens * d]
            self.sum_cos += (flat @ flat.T).cpu()
        self.count += flat_index.numel()


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float64); zero rows stay zero."""
    squares = (rows * rows).sum(-1, keepdim=True)
    return rows * torch.where(squares > 0, torch.rsqrt(squares), torch.zeros_like(squares))


class LinearMapMoments(Statistic):
    """Sufficient statistics of the ReplaceMe least-squares problem for block [s, e), i = s - 1.

    ``A = sum M_i^T M_i`` and ``B = sum M_i^T (h_e - Y_i)`` over all real tokens, with
    ``Y_i = h_{i+1} - M_i`` the residual stream after layer i's attention sub-block.
    """

    def __init__(self, kept_layer: int, block_end: int, hidden_size: int, device: torch.device | str = "cpu"):
        self.i, self.e = kept_layer, block_end
        self.A = torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=device)
        self.B = torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=device)
        self.count = 0

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.i, self.e)

    def hook_points(self) -> set[HookPoint]:
        return {(MLP_OUT, self.i), (RESIDUAL, self.i + 1), (RESIDUAL, self.e)}

    def update(self, batch: BatchActivations) -> None:
        m = batch.tokens(batch.mlp_out(self.i), "all").to(self.A.device)
        y = batch.tokens(batch.residual(self.i + 1), "all").to(self.A.device) - m
        target = batch.tokens(batch.residual(self.e), "all").to(self.A.device) - y
        self.A += m.T @ m
        self.B += m.T @ target
        self.count += m.shape[0]


class SubBlockSimilarity(Statistic):
    """LLM-Drop's per-layer sums of cos between what goes into and what comes out of each sub-block,
    over every real token (float64).

    ``drop_norm=True`` (reference default): attention ``cos(h_k, Y_k)``, MLP ``cos(Y_k, h_{k+1})`` (the
    stream before and after each residual add). ``drop_norm=False``: ``cos(norm(x), module(norm(x)))``, the
    sub-block's normalised input against its module's raw output.
    """

    def __init__(self, num_layers: int, drop_norm: bool = True):
        self.num_layers, self.drop_norm = num_layers, bool(drop_norm)
        self.sum_cos_attention = torch.zeros(num_layers, dtype=torch.float64)
        self.sum_cos_mlp = torch.zeros(num_layers, dtype=torch.float64)
        self.count = 0

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.num_layers, self.drop_norm)

    def hook_points(self) -> set[HookPoint]:
        layers = range(self.num_layers)
        if self.drop_norm:
            return ({(RESIDUAL, k) for k in range(self.num_layers + 1)} | {(ATTN_RESIDUAL, k) for k in layers})
        return {(kind, k) for kind in SUB_BLOCK_POINTS for k in layers}

    def _pairs(self, batch: BatchActivations, k: int) -> tuple[tuple, tuple]:
        p = batch.points
        if self.drop_norm:
            h, y, h_next = batch.residual(k), batch.attn_residual(k), batch.residual(k + 1)
            return (h, y), (y, h_next)
        return ((p[("attn_normed", k)], p[("attn_module_out", k)]),
                (p[("mlp_normed", k)], p[("mlp_module_out", k)]))

    def update(self, batch: BatchActivations) -> None:
        for k in range(self.num_layers):
            (a_in, a_out), (m_in, m_out) = self._pairs(batch, k)
            self.sum_cos_attention[k] += cosine_rows(batch.tokens(a_in, "all"), batch.tokens(a_out, "all")).sum().cpu()
            self.sum_cos_mlp[k] += cosine_rows(batch.tokens(m_in, "all"), batch.tokens(m_out, "all")).sum().cpu()
        self.count += int(batch.mask.sum())

    def mean_cosine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cos per layer: (attention [L], MLP [L])."""
        return self.sum_cos_attention / self.count, self.sum_cos_mlp / self.count


# --------------------------------------------------------------------------------------------
#: Bump when a statistic's definition changes, so cached values from older code are not reused.
STATISTICS_VERSION = 2


class _StopForward(Exception):
    pass


def unique(statistics: Iterable[Statistic]) -> list[Statistic]:
    """Drop statistics whose key repeats an earlier one's."""
    seen: dict[tuple, Statistic] = {}
    for stat in statistics:
        seen.setdefault(stat.key, stat)
    return list(seen.values())


@torch.no_grad()
def collect(adapter, batches: list[dict[str, torch.Tensor]], statistics: Iterable[Statistic],
            progress: bool = True, description: str = "calibration pass") -> list[Statistic]:
    """One forward pass over ``batches`` feeding every statistic; returns them updated."""
    from tqdm.auto import tqdm

    statistics = list(statistics)
    needed: set[HookPoint] = set().union(*(s.hook_points() for s in statistics)) if statistics else set()
    captured: dict[HookPoint, torch.Tensor] = {}
    handles = _register_hooks(adapter, needed, captured)
    device = adapter.embeddings().weight.device
    try:
        for batch in tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False):
            captured.clear()
            for stat in statistics:  # optional hook: a duck-typed statistic (a plugin's, a test's) may lack it
                begin = getattr(stat, "begin_batch", None)
                if begin is not None:
                    begin()
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            try:
                adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            missing = needed - captured.keys()
            if missing:  # an observer that never fired: fail here, naming the points, not in a statistic
                raise RuntimeError(f"activations {sorted(missing)} were not produced by the forward pass")
            real = mask.bool()
            acts = BatchActivations(points=dict(captured), mask=real, last_index=real.sum(1) - 1)
            check_finite(acts)
            for stat in statistics:
                stat.update(acts)
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    return statistics


def _register_hooks(adapter, needed: set[HookPoint], captured: dict) -> list:
    """Observers for the needed points, placed by the adapter (`ModelAdapter.observe_residual` /
    `observe_mlp_output`), and an early stop after the last layer any of them needs: also after the last decoder
    layer, since no statistic reads the final norm or the LM head (on SmolLM2 the head over its 49k-token
    vocabulary costs about a fifth of a pass). The stop is registered after the observers, so the last layer's
    own observers have fired when it ends the pass."""
    handles = []

    def keep(point):
        def observe(tensor):
            captured[point] = tensor.detach()
        return observe

    for point in sorted(needed):
        handles.append(observe_point(adapter, point, keep(point)))
    num_layers = adapter.num_layers
    last_needed = max([k - 1 if kind == RESIDUAL else k for kind, k in needed], default=num_layers - 1)
    if needed:  # nothing later is needed: skip the rest of the network (at the least the final norm and head)
        def stop():
            raise _StopForward
        handles.append(adapter.after_layer(max(last_needed, 0), stop))
    return handles


def observe_point(adapter, point: HookPoint, fn):
    """Call ``fn(x)`` with the activation at ``point`` on every forward, through the adapter's observer for its
    kind; returns the handle."""
    kind, k = point
    if kind == RESIDUAL:
        return adapter.observe_residual(k, fn)
    if kind == MLP_OUT:
        return adapter.observe_mlp_output(k, fn)
    if kind == ATTN_RESIDUAL:
        return adapter.observe_attention_residual(k, fn)
    if kind in SUB_BLOCK_POINTS:
        return adapter.observe_sub_block(k, *SUB_BLOCK_POINTS[kind], fn)
    raise ValueError(f"unknown hook point {kind!r}")


def producing_layer(point: HookPoint) -> int:
    """The decoder layer whose forward produces ``point`` (-1: the embeddings produce ``h_0``)."""
    kind, k = point
    return k - 1 if kind == RESIDUAL else k


def check_finite(acts: BatchActivations) -> None:
    """Raise `NumericalError` if an activation is not finite at a real token (padding may be)."""
    for (kind, k), x in acts.points.items():
        # The common case first: any NaN or +-inf makes the sum non-finite (a sum that merely
        # overflows falls through to the exact check). 160x cheaper than isfinite().all() in bfloat16.
        if bool(torch.isfinite(x.sum())):
            continue
        if not torch.isfinite(x[acts.mask.to(x.device)]).all():
            what = {RESIDUAL: f"h_{k} (input of layer {k})", MLP_OUT: f"M_{k} (MLP output of layer {k})",
                    ATTN_RESIDUAL: f"Y_{k} (after the attention of layer {k})"}.get(kind, f"{kind} of layer {k}")
            raise NumericalError(f"non-finite activations in {what} during calibration; check the data and model.dtype")

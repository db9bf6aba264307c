"""ReplaceMe (Shopkhoev et al. 2025, arXiv 2505.02819): remove UIDL's block(s), fold a linear map.

Selection is UIDL's: blocks [s, s+n) ranked by the mean last-token angular distance between h_s and
h_{s+n}; the ``num_blocks`` best non-overlapping ones are taken greedily (``merge_consecutive``
joins touching blocks into one). For each block, with ``i = s - 1`` the last kept layer before it,
a d x d matrix T is fitted so that ``Y_i + M_i T ~ h_e`` (rows = tokens, ``M_i`` layer i's MLP
output, ``Y_i`` the residual stream after its attention sub-block), and T is folded into layer i's
MLP output projection (``W <- T^T W``): zero new parameters.

Where a norm sits after the MLP (Gemma-2/3), a diagonal T folds exactly into the norm's gain; a full T
is applied as option ``norm_fold`` says: ``linear`` (default, docs/METHODS.md) inserts an explicit
``Linear(d, d)`` holding ``T^T`` after the norm (exact; d x d new parameters per kept layer; the saved
model needs ``depthbench.modeling.saving.load_pruned``), ``through_norm`` refits ``down_proj`` and the norm's gain
to approximate ``M T`` (zero new parameters; `depthbench.pruners.methods.replaceme_norm`). ``pruning.json`` says which.

- ``replaceme_ls``: T from the float64 normal equations ``(A + alpha I) T = B`` (``A = sum M^T M``,
  ``B = sum M^T (h_e - Y)``); every block's moments from one pass over the original model.
- ``replaceme_cosine``: T from Adam on a cosine (or MSE) objective over token rows spilled to disk;
  blocks fitted one after another, recalibrating the already-pruned model before each, as the
  reference does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from depthbench.calibration.spill import LinearMapRows
from depthbench.calibration.statistics import LinearMapMoments, PairwiseSimilarity
from depthbench.errors import ConfigError, NumericalError
from depthbench.measure import device_clock
from depthbench.modeling.saving import LOAD_INSTRUCTIONS
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.convergence import (SCHEDULES, ConvergenceLog, check_holdout, eval_interval, holdout_split,
                                            sum_budgets, training_budget)
from depthbench.pruners.options import option, run_seed_option
from depthbench.pruners.methods.replaceme_norm import ThroughNormFit
from depthbench.pruners.methods.uidl import last_token_angular_distances
from depthbench.selection.blocks import Block, greedy_blocks, merge_touching


# -- the least-squares solve ------------------------------------------------------------------
class _MomentsWithTargetNorm(LinearMapMoments):
    """`LinearMapMoments` plus ``C = sum ||h_e - Y_i||^2`` and ``D = sum ||h_e - h_{i+1}||^2``.

    With them the residual of any T follows from the moments alone:
    ``||M T - R||^2 = tr(T^T A T) - 2 tr(T^T B) + C``; ``D`` is the residual of removing the block
    with nothing in its place (T = I), a baseline for the fit.
    """

    def __init__(self, kept_layer: int, block_end: int, hidden_size: int, device="cpu"):
        super().__init__(kept_layer, block_end, hidden_size, device)
        self.target_sq = torch.zeros((), dtype=torch.float64)

    def update(self, batch) -> None:
        super().update(batch)
        m = batch.tokens(batch.mlp_out(self.i), "all")
        y = batch.tokens(batch.residual(self.i + 1), "all") - m
        target = batch.tokens(batch.residual(self.e), "all") - y
        self.target_sq += (target * target).sum().cpu()


def solve_linear_map(A: torch.Tensor, B: torch.Tensor, alpha: float = 0.0, diag: bool = False,
                     what: str = "ReplaceMe least squares") -> torch.Tensor:
    """``T = (A + alpha I)^-1 B`` in float64 by Cholesky (or ``T_jj = B_jj / (A_jj + alpha)``).

    Raises `NumericalError` when the system is singular or anything is not finite, so that no
    NaN or exploding weight ever reaches the model.
    """
    A, B = A.to(torch.float64), B.to(torch.float64)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise NumericalError(f"{what}: the moments A or B are not finite")
    d = A.shape[0]
    hint = ("set a positive ridge, e.g. pruner.options.alpha=1e-3 (scaled to the activations), or use "
            "more calibration tokens")
    if diag:
        a = A.diagonal() + alpha
        bad = int((a <= 0).sum())
        if bad:
            raise NumericalError(f"{what}: {bad} of {d} diagonal entries of A + alpha I are not positive "
                                 f"(dimensions the kept layer's MLP never writes); {hint}")
        T = torch.diag(B.diagonal() / a)
    else:
        G = A + alpha * torch.eye(d, dtype=A.dtype, device=A.device)
        eig = torch.linalg.eigvalsh(G)
        top = float(eig[-1])
        if not top > 0 or float(eig[0]) <= d * torch.finfo(torch.float64).eps * top:
            raise NumericalError(
                f"{what}: A + alpha I is singular (eigenvalues {float(eig[0]):.3g} .. {top:.3g} for a {d} x {d} "
                f"system; fewer independent tokens than hidden dimensions?); {hint}")
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            raise NumericalError(f"{what}: Cholesky factorisation of A + alpha I failed; {hint}")
        T = torch.cholesky_solve(B, L)
    if not torch.isfinite(T).all():
        raise NumericalError(f"{what}: the solution T is not finite; {hint}")
    return T


def _relative_residuals(stat: _MomentsWithTargetNorm, T: torch.Tensor) -> dict:
    A, B, C = stat.A, stat.B, float(stat.target_sq)
    T = T.to(device=A.device, dtype=torch.float64)
    res = float((T * (A @ T)).sum() - 2 * (T * B).sum()) + C
    res_identity = float(A.trace() - 2 * B.trace()) + C
    scale = max(C, torch.finfo(torch.float64).tiny)
    return {"relative_residual": math.sqrt(max(res, 0.0) / scale),
            "relative_residual_without_transform": math.sqrt(max(res_identity, 0.0) / scale),
            "tokens": stat.count}


# -- folding T into the model -------------------------------------------------------------------
@dataclass
class _Fold:
    """Makes a kept layer's MLP output M become ``M T``: exactly where the adapter can (no norm after the
    MLP, a diagonal T, a linear module already there), else as ``route`` (option ``norm_fold``) says."""

    route: str | None
    through_norm: ThroughNormFit | None = None

    def __call__(self, adapter, layer_index: int, T: torch.Tensor) -> None:
        surgery = ModelSurgery(adapter)
        try:
            surgery.fold_into_mlp_output(layer_index, T)
            return
        except NotImplementedError:
            if self.route is None:
                raise
        if self.route == "linear":  # docs/METHODS.md: an explicit linear module after the norm
            surgery.insert_mlp_output_linear(layer_index, T)
        else:
            down, gain = self.through_norm(adapter, layer_index, T.to(torch.float64))
            surgery.fold_through_output_norm(layer_index, down, gain)


# -- shared selection -------------------------------------------------------------------------
@dataclass
class _BlockOptions:
    num_blocks: int = option(1, "Number of n-layer blocks (n = layers to remove / num_blocks), taken greedily by "
                                "distance without overlap; 1 = the reference default (num_A: 1).")
    merge_consecutive: bool = option(True, "Join blocks that touch into one block with one T (reference configs: "
                                           "true); false fits touching blocks in turn, composing their transforms "
                                           "in the same kept layer.")
    min_start: int = option(1, "First candidate block start; >= 1 because T folds into the kept layer s-1 "
                               "(1 = reference).")
    norm_fold: str = option("linear", "Only where a norm follows the MLP (Gemma-2/3) and T is full: linear = an "
                                      "explicit Linear(d, d) holding T^T after the norm (exact, d x d new "
                                      "parameters, the saved model needs depthbench.modeling.saving.load_pruned); "
                                      "through_norm = down_proj and the norm's gain refitted to approximate M T (zero "
                                      "new parameters, plain from_pretrained). Ignored elsewhere.")


#: Values of option ``norm_fold`` (how a full T is applied after a norm; ignored without one).
NORM_FOLDS = ("linear", "through_norm")


class _ReplaceMe(Pruner):
    """Shared selection and folding of both ReplaceMe variants."""

    paper = ("Shopkhoev et al. 2025, ReplaceMe: Network Simplification via Layer Pruning and Linear "
             "Transformations (arXiv 2505.02819)")

    Options = _BlockOptions
    fit_reads_activations = True
    #: Layer-wise (``model.layerwise=true``): T is fitted on statistics or token rows of single passes and folds
    #: into the kept layers before the blocks (`layers_apply_changes`); ReplaceMe-cosine's later blocks train on
    #: a layer-wise pass over the model as pruned so far (`depthbench.calibration.layerwise.LayerwiseService.current`).
    supports_layerwise = True

    def validate_options(self) -> None:
        o = self.options
        if o.num_blocks < 1:
            raise ConfigError(f"{self.name} num_blocks={o.num_blocks!r}; allowed: a positive integer")
        if o.min_start < 1:
            raise ConfigError(
                f"{self.name} min_start={o.min_start!r}; allowed: an integer >= 1 (the transform folds into the "
                f"kept layer s - 1 before the block, so a block cannot start at layer 0)")
        if o.norm_fold not in NORM_FOLDS:
            raise ConfigError(f"{self.name} norm_fold={o.norm_fold!r}; allowed: {', '.join(NORM_FOLDS)}")

    def block_length(self, n_remove: int) -> int:
        if n_remove % self.options.num_blocks:
            raise ConfigError(f"{self.name}: {n_remove} layers to remove do not split into num_blocks="
                              f"{self.options.num_blocks} equal blocks")
        return n_remove // self.options.num_blocks

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        super().check_feasible(num_layers, n_remove)
        n = self.block_length(n_remove)
        if self.options.num_blocks * n > num_layers - self.options.min_start:
            raise ConfigError(f"{self.options.num_blocks} block(s) of {n} layers starting at >= "
                              f"{self.options.min_start} do not fit in {num_layers} layers")

    def check_model(self, adapter) -> None:
        if adapter.mlp_output_norm(adapter.layer(0)) is not None:
            return  # a norm after the MLP (Gemma-2/3): T goes into / through it, see pruners/methods/replaceme_norm.py
        try:
            ModelSurgery(adapter).check_exact_fold()
        except NotImplementedError as err:
            raise ConfigError(f"pruner {self.name!r} cannot prune this model: {err}") from err

    def norm_route(self, adapter) -> str | None:
        """How a full T is applied on this model: ``norm_fold`` where a norm follows the MLP (Gemma-2/3),
        else None (T folds into the MLP output projection)."""
        return self.options.norm_fold if adapter.mlp_output_norm(adapter.layer(0)) is not None else None

    def folder(self, adapter, service) -> "_Fold":
        """What folds this prune's transforms into the model (it keeps the through-norm fits' log)."""
        route = self.norm_route(adapter)
        through_norm = None
        if route == "through_norm":
            through_norm = ThroughNormFit(service.batches, service.progress, self.name,
                                          seed=getattr(self.options, "seed", 0),
                                          spill_dir=getattr(self.options, "spill_dir", None))
        return _Fold(route, through_norm)

    def statistics(self, adapter, n_remove):
        return [PairwiseSimilarity(adapter.num_layers, gap=self.block_length(n_remove), tokens="last")]

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        n = self.block_length(n_remove)
        starts, d = last_token_angular_distances(statistics, n, self.options.min_start)
        chosen = greedy_blocks(d, starts, n, self.options.num_blocks)
        blocks = merge_touching(chosen) if self.options.merge_consecutive else sorted(chosen)
        if any(b.start < 1 for b in blocks):
            raise ConfigError(f"{self.name}: a block starts at layer 0, where no kept layer precedes it; "
                              f"min_start must be >= 1")
        self.check_blocks(blocks)
        removed = sorted(k for b in blocks for k in b.layers)
        return Selection(
            removed_layers=removed,
            blocks=blocks,
            scores={"metric": "mean last-token angular distance d(s) between h_s and h_{s+n}",
                    "n": n, "starts": starts, "values": d,
                    "chosen_blocks": [[b.start, b.end] for b in sorted(chosen)],
                    "kept_layers": [b.start - 1 for b in blocks]},
        )

    def check_blocks(self, blocks: list[Block]) -> None:
        """Variant-specific restrictions on the chosen blocks."""

    def layers_apply_changes(self, selection: Selection) -> list[int]:
        """The kept layer before each block (original numbering): T folds into its MLP output projection. With
        unmerged touching blocks (ReplaceMe-cosine, ``merge_consecutive: false``) the later block's kept layer is
        the one before the earlier block, as `ReplaceMeCosinePruner.apply` folds it."""
        removed: set[int] = set()
        kept = []
        for block in sorted(selection.blocks):
            kept.append(max(k for k in range(block.start) if k not in removed))
            removed.update(block.layers)
        return sorted(set(kept))

    def check_layerwise(self, adapter) -> None:
        if self.norm_route(adapter) is not None:
            raise ConfigError(f"{self.name} with model.layerwise=true folds T into the MLP output projection only; "
                              f"{adapter.family} has a norm after the MLP (its routes need the whole model)")

    def describe(self, adapter, fold: "_Fold", fits: list[dict], diagonal: bool = False) -> dict:
        """The ``replacement`` entry of pruning.json: how T was applied, per block, and whether the saved
        model needs custom code (only for explicit linear modules after a norm)."""
        if fold.route is None:
            return {"kind": "linear transform T folded into the MLP output projection of the kept layer before "
                            "each block (W_down <- T^T W_down)",
                    "new_parameters": 0, "custom_code_needed": False,
                    "blocks": fits}
        if diagonal:
            kind = ("diagonal T folded exactly into the post-FFN norm of the kept layer before each block "
                    "(post_feedforward_layernorm: 1 + weight <- (1 + weight) * diag(T))")
            fits = [{**fit, "applied": "exact, into the post-FFN norm's gain"} for fit in fits]
        elif fold.route == "linear":
            d, layers = adapter.hidden_size, {fit["folded_into_layer"] for fit in fits}
            return {"kind": ("full T as an explicit Linear(d, d, bias=False) holding T^T after the post-FFN norm of "
                             "the kept layer before each block (M' = M T, exact up to the model dtype)"),
                    "new_parameters": d * d * len(layers), "custom_code_needed": True,
                    "loading": LOAD_INSTRUCTIONS,
                    "blocks": [{**fit, "applied": "explicit linear module after the post-FFN norm (exact)"}
                               for fit in fits]}
        else:
            kind = ("full T realised through the post-FFN norm of the kept layer before each block: "
                    "W_down <- P^T W_down "
                    "and the norm's gain g' fitted so that RMSNorm(u P) * g' ~ M T on calibration tokens (approximate; "
                    "through_norm_relative_error per block)")
            fits = [{**fit, "applied": "fitted through the post-FFN norm (down_proj and norm gain)", **log}
                    for fit, log in zip(fits, fold.through_norm.log, strict=True)]
        return {"kind": kind, "new_parameters": 0, "custom_code_needed": False, "blocks": fits}


# -- ReplaceMe-LS -----------------------------------------------------------------------------
@pruner_registry.register("replaceme_ls")
class ReplaceMeLSPruner(_ReplaceMe):
    """ReplaceMe with the closed-form least-squares transform (reference: ``lstsq``)."""

    name = "replaceme_ls"

    @dataclass
    class Options(_BlockOptions):
        alpha: float = option(0.0, "Ridge: T = (A + alpha I)^-1 B; 0 = the reference (plain least squares). On the "
                                   "scale of the activations' second moments.")
        diag: bool = option(False, "Diagonal T (T_jj = B_jj / (A_jj + alpha)) instead of a full d x d matrix.")

    def validate_options(self) -> None:
        super().validate_options()
        a = self.options.alpha
        if not math.isfinite(a) or a < 0:
            raise ConfigError(f"replaceme_ls alpha={a!r}; allowed: a finite number >= 0")

    def check_blocks(self, blocks: list[Block]) -> None:
        for a, b in zip(blocks, blocks[1:]):
            if a.end == b.start:
                raise ConfigError(
                    f"replaceme_ls: blocks [{a.start}, {a.end}) and [{b.start}, {b.end}) touch, so the second has "
                    f"no kept layer of the original model before it; set merge_consecutive: true")

    def fit(self, adapter, selection, service) -> list[tuple[Block, torch.Tensor, dict]]:
        device = adapter.embeddings().weight.device
        stats = [_MomentsWithTargetNorm(b.start - 1, b.end, adapter.hidden_size, device) for b in selection.blocks]
        # All blocks' moments in one pass over the original model (cached: an alpha/diag ablation on
        # the same block and data does no pass at all).
        stats = service.original(stats, "moments")
        fits = []
        for block, stat in zip(selection.blocks, stats):
            if stat.count == 0:
                raise NumericalError(f"{self.name}: no calibration tokens reached block [{block.start}, {block.end})")
            T = solve_linear_map(stat.A, stat.B, float(self.options.alpha), self.options.diag,
                                 what=f"{self.name} block [{block.start}, {block.end})")
            fits.append((block, T, _relative_residuals(stat, T)))
        return fits

    def apply(self, adapter, selection, replacement, service) -> dict:
        info = []
        fold = self.folder(adapter, service)
        for block, T, diagnostics in replacement:
            fold(adapter, block.start - 1, T)
            info.append({"block": [block.start, block.end], "folded_into_layer": block.start - 1,
                         "solver": "diagonal" if self.options.diag else "cholesky",
                         "alpha": float(self.options.alpha), **diagnostics})
        ModelSurgery(adapter).remove_layers(selection.removed_layers)
        return self.describe(adapter, fold, info, diagonal=self.options.diag)


# -- ReplaceMe-cosine -------------------------------------------------------------------------
def transform_objective(m: torch.Tensor, y: torch.Tensor, h: torch.Tensor, T: torch.Tensor,
                        loss: str, accurate: bool) -> torch.Tensor:
    """Per-row loss of the transform T on token rows (M_i, Y_i, h_e).

    cosine: ``1 - cos(M T, h_e - Y)`` (reference) or ``1 - cos(M T + Y, h_e)`` (accurate);
    mse: the mean over dimensions of ``(M T + Y - h_e)^2`` (the same for both forms).
    """
    mt = m @ T
    if loss == "mse":
        return ((mt + y - h) ** 2).mean(-1)
    if accurate:
        return 1 - F.cosine_similarity(mt + y, h, dim=-1, eps=1e-8)
    return 1 - F.cosine_similarity(mt, h - y, dim=-1, eps=1e-8)


def _rows(arrays: dict, index: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    """The rows ``index`` of every column on ``device``: gathered from files (`SpillArray`) or from tensors
    already on the device (`DeviceRows`)."""
    return tuple(torch.as_tensor(arrays[name][index]).to(device) for name in LinearMapRows.COLUMNS)


@torch.no_grad()
def _mean_objective(arrays, T, loss, accurate, chunk, device, index: np.ndarray | None = None) -> float:
    """Mean per-row objective of T over the rows ``index`` (all rows where None), in float64."""
    index = np.arange(arrays["mlp_out"].shape[0]) if index is None else index
    total, T = 0.0, T.to(torch.float64)
    for start in range(0, len(index), chunk):
        m, y, h = (t.to(torch.float64) for t in _rows(arrays, index[start:start + chunk], device))
        total += float(transform_objective(m, y, h, T, loss, accurate).sum())
    return total / len(index)


@torch.no_grad()
def _normal_equations(arrays, index: np.ndarray, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sum M^T M`` and ``B = sum M^T (h_e - Y)`` over the rows ``index``, accumulated in float64."""
    d = arrays["mlp_out"].shape[1]
    A = torch.zeros(d, d, dtype=torch.float64, device=device)
    B = torch.zeros(d, d, dtype=torch.float64, device=device)
    for start in range(0, len(index), chunk):
        m, y, h = (t.to(torch.float64) for t in _rows(arrays, index[start:start + chunk], device))
        A += m.T @ m
        B += m.T @ (h - y)
    return A, B


def least_squares_transform(arrays, index: np.ndarray, chunk: int, device, what: str = "",
                            moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The closed-form optimum of the MSE objective on the rows ``index``: ``T = A^-1 B`` (`_normal_equations`,
    or ``moments`` already accumulated on those rows) solved by `solve_linear_map`."""
    return solve_linear_map(*(moments or _normal_equations(arrays, index, chunk, device)),
                            what=f"{what}: least-squares T on the training rows")


def whitening(arrays, index: np.ndarray, chunk: int, device, what: str = "",
              moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``P = L^-T`` with ``L L^T = M^T M / n`` over the rows ``index`` (float64): with ``T = P U`` the mse
    objective's Hessian in ``U`` is the identity (whitened inputs ``M P``), whatever the spread of M's
    eigenvalues. Raises `NumericalError` when ``M^T M`` is singular (fewer independent rows than dimensions)."""
    A, _ = moments or _normal_equations(arrays, index, chunk, device)
    L, info = torch.linalg.cholesky_ex(A / len(index))
    if int(info) != 0:
        raise NumericalError(f"{what}: precondition=whiten needs M^T M to be positive definite (Cholesky failed); "
                             "use more calibration tokens than hidden dimensions or precondition=none")
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve_triangular(L.T, eye, upper=True)


#: Values of option ``init`` of ReplaceMe-cosine.
INITS = ("identity", "ls")
#: Values of option ``precondition`` of ReplaceMe-cosine.
PRECONDITIONS = ("none", "whiten")


def train_transform(arrays: dict[str, np.ndarray], loss: str, accurate: bool, lr: float, epochs: int,
                    batch_size: int, seed: int, device, progress: bool = True, what: str = "", *,
                    holdout: float = 0.0, eval_every: int = 0, keep_best: bool = False, init: str = "identity",
                    schedule: str = "constant", precondition: str = "none") -> tuple[torch.Tensor, dict]:
    """Adam on T (float32) over shuffled mini-batches of the spilled token rows' training part.

    ``holdout``: fraction of the rows (seeded by ``seed``, disjoint from the training rows) on which the
    objective is measured every ``eval_every`` steps (0 = once per epoch) and never trained on;
    ``keep_best``: return the T with the lowest held-out objective (the initial T included) instead of the
    last; ``init``: identity (reference) or the least-squares T of the training rows; ``schedule``: constant
    learning rate (reference) or cosine decay to 0 over the steps; ``precondition``: none (reference: Adam on
    T's entries) or whiten (Adam on U with ``T = P U``, P from `whitening`: same objective, same start, a
    perfectly conditioned mse Hessian). With ``loss=mse`` the closed-form optimum of the same objective on the
    same training rows is computed and the relative gap to it recorded.
    """
    rows, d = arrays["mlp_out"].shape
    train_rows, held_rows = holdout_split(rows, holdout, seed)
    chunk = max(batch_size, 4096)
    T_ls, no_optimum = None, None
    # one pass over the training rows for every use of their moments (LS start, LS gap, whitening)
    moments = (_normal_equations(arrays, train_rows, chunk, device)
               if init == "ls" or loss == "mse" or precondition == "whiten" else None)
    if init == "ls":
        T_ls = least_squares_transform(arrays, train_rows, chunk, device, what, moments)
    elif loss == "mse":  # only for the diagnostic gap: a singular system (fewer rows than dimensions) is no error
        try:
            T_ls = least_squares_transform(arrays, train_rows, chunk, device, what, moments)
        except NumericalError as err:
            no_optimum = str(err)
    start_T = T_ls.to(torch.float32) if init == "ls" else torch.eye(d, dtype=torch.float32, device=device)
    P = whitening(arrays, train_rows, chunk, device, what, moments) if precondition == "whiten" else None
    U = (start_T if P is None else torch.linalg.solve(P, start_T.to(torch.float64)).to(torch.float32)).clone()
    U.requires_grad_(True)
    P32 = None if P is None else P.to(torch.float32)

    def transform() -> torch.Tensor:
        """The current T (differentiable in U)."""
        return U if P32 is None else P32 @ U

    optimizer = torch.optim.Adam([U], lr=lr)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps) if schedule == "cosine"
                 else None)
    interval = eval_interval(eval_every, total_steps, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)

    def held_out(t) -> float | None:
        return _mean_objective(arrays, t, loss, accurate, chunk, device, held_rows) if len(held_rows) else None

    before = _mean_objective(arrays, start_T, loss, accurate, chunk, device)
    train_before = _mean_objective(arrays, start_T, loss, accurate, chunk, device, train_rows)
    curve = ConvergenceLog(what)
    curve.record(0, train_before, held_out(start_T), lambda: start_T.clone())
    steps, epoch_losses, running, running_rows = 0, [], 0.0, 0
    for _ in tqdm(range(epochs), desc=f"{what}: training T", unit="epoch", disable=not progress, leave=False):
        order = train_rows[torch.randperm(len(train_rows), generator=generator).numpy()]
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = np.sort(order[start:start + batch_size])  # sorted: sequential reads from the spill file
            m, y, h = _rows(arrays, index, device)
            batch_loss = transform_objective(m, y, h, transform(), loss, accurate).mean()
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(batch_loss.detach()) * len(index)
            running, running_rows = running + float(batch_loss.detach()) * len(index), running_rows + len(index)
            steps += 1
            if steps % interval == 0 or steps == total_steps:
                with torch.no_grad():
                    T_now = transform().detach().clone()
                curve.record(steps, running / running_rows, held_out(T_now), lambda state=T_now: state)
                running, running_rows = 0.0, 0
        epoch_losses.append(total / len(train_rows))
    with torch.no_grad():
        T = transform().detach()
    if not torch.isfinite(T).all():
        raise NumericalError(f"{what}: training diverged (T is not finite); lower pruner.options.lr")
    if keep_best:
        T = curve.best_state
    after = _mean_objective(arrays, T, loss, accurate, chunk, device)
    train_after = _mean_objective(arrays, T, loss, accurate, chunk, device, train_rows)
    convergence = curve.summary(keep_best, final_train=train_after)
    diagnostics = {"objective_at_identity" if init == "identity" else "objective_at_init": before,
                   "objective_after": after, "objective_train_before": train_before,
                   "objective_train_after": train_after, "epoch_losses": epoch_losses, "steps": steps,
                   "tokens": rows, "training_rows": len(train_rows), "held_out_rows": len(held_rows),
                   "init": init, "schedule": schedule, "precondition": precondition, "convergence": convergence,
                   "budget": training_budget(rows, len(train_rows) * epochs, steps, epochs, len(held_rows))}
    if loss == "mse" and T_ls is None:
        diagnostics["ls_optimum"] = {"objective": None, "relative_gap": None, "about": no_optimum}
    elif loss == "mse":
        optimum = _mean_objective(arrays, T_ls, loss, accurate, chunk, device, train_rows)
        diagnostics["ls_optimum"] = {
            "objective": optimum,
            "relative_gap": (train_after - optimum) / max(optimum, torch.finfo(torch.float64).tiny),
            "about": "training-rows MSE of the returned T minus that of the float64 least-squares T on the same "
                     "rows, relative to the latter"}
    return T, diagnostics


@pruner_registry.register("replaceme_cosine")
class ReplaceMeCosinePruner(_ReplaceMe):
    """ReplaceMe with T trained by Adam on the cosine distance (reference default: ``cosine``)."""

    name = "replaceme_cosine"

    @dataclass
    class Options(_BlockOptions):
        loss: str = option("cosine", "Objective: cosine = 1 - mean cos (reference); mse = mean squared error of "
                                     "M_i T + Y_i against h_e.")
        accurate: bool = option(False, "false: cos(M_i T, h_e - Y_i) (reference default); true: cos(M_i T + Y_i, "
                                       "h_e) (the faithful objective).")
        lr: float = option(1e-4, "Adam learning rate (reference 1e-4).")
        epochs: int = option(10, "Passes over all calibration token rows (reference 10).")
        batch_size: int = option(1024, "Token rows per Adam step (reference 1024).")
        seed: int = run_seed_option("Seed of the row shuffling and of the held-out split.")
        holdout: float = option(0.1, "Fraction of the token rows held out of training (seeded, disjoint) to "
                                     "measure convergence: held-out objective curve, best state, "
                                     "worse_than_initial. 0 = train on every row as the reference does.")
        eval_every: int = option(0, "Optimiser steps between two objective measurements (0 = once per epoch).")
        keep_best: bool = option(False, "Return the T with the lowest held-out objective (the initial T "
                                        "included) instead of the last one (false = reference). Needs holdout > 0.")
        init: str = option("identity", "Start of T: identity (reference) or ls = the least-squares T of the "
                                       "training rows (an improvement beyond the reference).")
        schedule: str = option("constant", "Learning rate: constant (reference) or cosine = cosine decay to 0 "
                                           "over all steps (beyond the reference).")
        precondition: str = option("none", "none (reference): Adam on the entries of T; whiten = Adam on U with "
                                           "T = L^-T U, L L^T = M^T M / n of the training rows, which makes the mse "
                                           "objective's Hessian the identity (beyond the reference).")
        spill_dir: str | None = option(None, "Directory for the temporary spill files of token rows (3 x tokens x "
                                             "hidden x 4 bytes, deleted afterwards) where they do not fit "
                                             "cache.activations_memory_gb (then they stay on the model's device); "
                                             "null = the system temp dir.")

    def validate_options(self) -> None:
        super().validate_options()
        o = self.options
        if o.loss not in ("cosine", "mse"):
            raise ConfigError(f"replaceme_cosine loss={o.loss!r}; allowed: cosine, mse")
        if not o.lr > 0 or not math.isfinite(o.lr):
            raise ConfigError(f"replaceme_cosine lr={o.lr!r}; allowed: a positive number")
        for name in ("epochs", "batch_size"):
            if getattr(o, name) < 1:
                raise ConfigError(f"replaceme_cosine {name}={getattr(o, name)!r}; allowed: a positive integer")
        check_holdout(self.name, o.holdout)
        if o.eval_every < 0:
            raise ConfigError(f"replaceme_cosine eval_every={o.eval_every!r}; allowed: an integer >= 0 (0 = per epoch)")
        if o.keep_best and o.holdout == 0:
            raise ConfigError("replaceme_cosine keep_best=true needs held-out rows to choose by; allowed: holdout > 0 "
                              "or keep_best=false")
        if o.init not in INITS:
            raise ConfigError(f"replaceme_cosine init={o.init!r}; allowed: {', '.join(INITS)}")
        if o.schedule not in SCHEDULES:
            raise ConfigError(f"replaceme_cosine schedule={o.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if o.precondition not in PRECONDITIONS:
            raise ConfigError(f"replaceme_cosine precondition={o.precondition!r}; allowed: {', '.join(PRECONDITIONS)}")

    def train(self, adapter, service, kept: int, end: int, rows_from, what: str) -> tuple[torch.Tensor, dict]:
        """T for the block ending at ``end`` (current numbering) after the kept layer ``kept``, trained on
        token rows from ``rows_from`` (``service.original`` or ``service.current``)."""
        o = self.options
        device = adapter.embeddings().weight.device
        tokens = service.calibration.n_tokens
        with service.rows_storage(LinearMapRows.storage_bytes(tokens, adapter.hidden_size), "depthbench-replaceme-",
                                  o.spill_dir) as storage:
            spill = LinearMapRows(kept, end, adapter.hidden_size, storage, capacity=tokens)
            rows_from([spill], f"{what}: rows")
            arrays = spill.open()
            started = device_clock(device)
            T, diagnostics = train_transform(arrays, o.loss, o.accurate, float(o.lr), o.epochs, o.batch_size,
                                             o.seed, device, service.progress, what,
                                             holdout=float(o.holdout), eval_every=o.eval_every,
                                             keep_best=o.keep_best, init=o.init, schedule=o.schedule,
                                             precondition=o.precondition)
            diagnostics.update(training_rows=storage.where, training_seconds=device_clock(device) - started)
            del arrays
        return T, diagnostics

    def fit(self, adapter, selection, service) -> tuple[torch.Tensor, dict]:
        """T of the first block, on the original model's token rows (cached / stored activations)."""
        first = min(selection.blocks)
        return self.train(adapter, service, first.start - 1, first.end, service.original,
                          f"{self.name} block [{first.start}, {first.end})")

    def apply(self, adapter, selection, replacement, service) -> dict:
        """Fold and remove block after block. The reference recalibrates the already-pruned model before
        each next block, so every block after the first is trained here, on a fresh pass over the model
        as pruned so far (with one block, the default, all training happens in `fit`)."""
        o = self.options
        fold = self.folder(adapter, service)
        fits, removed_so_far = [], 0
        alive = list(range(adapter.num_layers))  # original index of each current layer
        for block in sorted(selection.blocks):
            s, e = block.start - removed_so_far, block.end - removed_so_far  # current numbering
            if removed_so_far == 0:
                T, diagnostics = replacement
            else:
                T, diagnostics = self.train(adapter, service, s - 1, e, service.current,
                                            f"{self.name} block [{block.start}, {block.end})")
            fold(adapter, s - 1, T)
            ModelSurgery(adapter).remove_layers(range(s, e))
            # with unmerged touching blocks, the kept layer is the one before the previous block
            fits.append({"block": [block.start, block.end], "folded_into_layer": alive[s - 1],
                         "layer_index_when_folded": s - 1, "loss": o.loss, "accurate": o.accurate,
                         **diagnostics})
            removed_so_far += len(block)
            del alive[s:e]
        described = self.describe(adapter, fold, fits)
        described["budget"] = sum_budgets([fit["budget"] for fit in fits])
        return described

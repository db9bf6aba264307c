"""ReplaceMe (Shopkhoev et al. 2025, arXiv 2505.02819): remove UIDL's block(s), fold a linear map.

Selection is UIDL's: blocks [s, s+n) ranked by the mean last-token angular distance between h_s and
h_{s+n}; the ``num_blocks`` best non-overlapping ones are taken greedily (``merge_consecutive``
joins touching blocks into one). For each block, with ``i = s - 1`` the last kept layer before it,
a d x d matrix T is fitted so that ``Y_i + M_i T ~ h_e`` (rows = tokens, ``M_i`` layer i's MLP
output, ``Y_i`` the residual stream after its attention sub-block), and T is folded into layer i's
MLP output projection (``W <- T^T W``): zero new parameters.

Where a norm sits after the MLP (Gemma-2/3), a diagonal T folds exactly into the norm's gain; a full T
is applied as option ``norm_fold`` says: ``linear`` (default, METHODS.md) inserts an explicit
``Linear(d, d)`` holding ``T^T`` after the norm (exact; d x d new parameters per kept layer; the saved
model needs ``depthbench.modeling.saving.load_pruned``), ``through_norm`` refits ``down_proj`` and the norm's gain
to approximate ``M T`` (zero new parameters; `depthbench.pruners.replaceme_norm`). ``pruning.json`` says which.

- ``replaceme_ls``: T from the float64 normal equations ``(A + alpha I) T = B`` (``A = sum M^T M``,
  ``B = sum M^T (h_e - Y)``); every block's moments from one pass over the original model.
- ``replaceme_cosine``: T from Adam on a cosine (or MSE) objective over token rows spilled to disk;
  blocks fitted one after another, recalibrating the already-pruned model before each, as the
  reference does.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from depthbench.calibration.spill import LinearMapRows
from depthbench.calibration.statistics import LinearMapMoments, PairwiseSimilarity, collect
from depthbench.errors import ConfigError, NumericalError
from depthbench.modeling.saving import LOAD_INSTRUCTIONS
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.replaceme_norm import ThroughNormFit
from depthbench.pruners.uidl import last_token_angular_distances
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


# -- shared selection -------------------------------------------------------------------------
@dataclass
class _BlockOptions:
    # Number of n-layer blocks (n = layers to remove / num_blocks), chosen greedily by distance.
    num_blocks: int = 1
    # Join blocks that touch into one block with one transform.
    merge_consecutive: bool = True
    # First candidate block start; must be >= 1 (the transform folds into layer s - 1).
    min_start: int = 1
    # Only where a norm follows the MLP (Gemma-2/3) and T is full: linear = an explicit Linear(d, d)
    # after the norm (exact, d x d new parameters, custom code to load); through_norm = down_proj and
    # the norm's gain refitted to approximate M T (zero new parameters, plain from_pretrained).
    norm_fold: str = "linear"


#: Values of option ``norm_fold`` (how a full T is applied after a norm; ignored without one).
NORM_FOLDS = ("linear", "through_norm")


class _ReplaceMe(Pruner):
    """Shared selection and folding of both ReplaceMe variants."""

    paper = ("Shopkhoev et al. 2025, ReplaceMe: Network Simplification via Layer Pruning and Linear "
             "Transformations (arXiv 2505.02819)")

    Options = _BlockOptions
    fit_reads_activations = True

    def validate_options(self) -> None:
        o = self.options
        if isinstance(o.num_blocks, bool) or not isinstance(o.num_blocks, int) or o.num_blocks < 1:
            raise ConfigError(f"{self.name} num_blocks={o.num_blocks!r}; allowed: a positive integer")
        if not isinstance(o.merge_consecutive, bool):
            raise ConfigError(f"{self.name} merge_consecutive={o.merge_consecutive!r}; allowed: true or false")
        if isinstance(o.min_start, bool) or not isinstance(o.min_start, int) or o.min_start < 1:
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
            return  # a norm after the MLP (Gemma-2/3): T goes into / through it, see pruners/replaceme_norm.py
        try:
            adapter.check_exact_fold()
        except NotImplementedError as err:
            raise ConfigError(f"pruner {self.name!r} cannot prune this model: {err}") from err

    #: Set by `prune` on models with a norm after the MLP and ``norm_fold: through_norm``.
    through_norm: ThroughNormFit | None = None
    #: Set by `prune`: ``norm_fold`` where a norm follows the MLP, else None; and the hidden size.
    norm_route: str | None = None
    hidden_size: int = 0

    def prune(self, adapter, calibration, n_remove, progress=True, **kwargs):
        """`Pruner.prune`, recording how a full T will be applied on a model with a norm after the MLP
        (Gemma-2/3); the through-norm fit needs the calibration batches at fold time, which neither
        `fit` nor `apply` of ReplaceMe-LS receives."""
        self.hidden_size = adapter.hidden_size
        has_norm = adapter.mlp_output_norm(adapter.layer(0)) is not None
        self.norm_route = self.options.norm_fold if has_norm else None
        self.through_norm = None
        if self.norm_route == "through_norm":
            self.through_norm = ThroughNormFit(calibration.batches, progress, self.name,
                                               seed=getattr(self.options, "seed", 0),
                                               spill_dir=getattr(self.options, "spill_dir", None))
        return super().prune(adapter, calibration, n_remove, progress, **kwargs)

    def fold(self, adapter, layer_index: int, T: torch.Tensor) -> None:
        """Make layer ``layer_index``'s MLP output M become ``M T``: exactly where the adapter can (no
        norm after the MLP, a diagonal T, a linear module already there), else by ``norm_fold``."""
        try:
            adapter.fold_into_mlp_output(layer_index, T)
            return
        except NotImplementedError:
            if self.norm_route is None:
                raise
        if self.norm_route == "linear":  # METHODS.md: an explicit linear module after the norm
            adapter.insert_mlp_output_linear(layer_index, T)
        else:
            down, gain = self.through_norm(adapter, layer_index, T.to(torch.float64))
            adapter.fold_through_output_norm(layer_index, down, gain)

    def statistics(self, adapter, n_remove):
        return [PairwiseSimilarity(adapter.num_layers, gap=self.block_length(n_remove), tokens="last")]

    def select(self, statistics, adapter, n_remove) -> Selection:
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

    def describe(self, fits: list[dict], diagonal: bool = False) -> dict:
        """The ``replacement`` entry of pruning.json: how T was applied, per block, and whether the saved
        model needs custom code (only for explicit linear modules after a norm)."""
        if self.norm_route is None:
            return {"kind": "linear transform T folded into the MLP output projection of the kept layer before "
                            "each block (W_down <- T^T W_down)",
                    "new_parameters": 0, "custom_code_needed": False,
                    "blocks": fits}
        if diagonal:
            kind = ("diagonal T folded exactly into the post-FFN norm of the kept layer before each block "
                    "(post_feedforward_layernorm: 1 + weight <- (1 + weight) * diag(T))")
            fits = [{**fit, "applied": "exact, into the post-FFN norm's gain"} for fit in fits]
        elif self.norm_route == "linear":
            d, layers = self.hidden_size, {fit["folded_into_layer"] for fit in fits}
            return {"kind": ("full T as an explicit Linear(d, d, bias=False) holding T^T after the post-FFN norm of "
                             "the kept layer before each block (M' = M T, exact up to the model dtype)"),
                    "new_parameters": d * d * len(layers), "custom_code_needed": True,
                    "loading": LOAD_INSTRUCTIONS,
                    "blocks": [{**fit, "applied": "explicit linear module after the post-FFN norm (exact)"}
                               for fit in fits]}
        else:
            kind = ("full T realised through the post-FFN norm of the kept layer before each block: W_down <- P^T W_down "
                    "and the norm's gain g' fitted so that RMSNorm(u P) * g' ~ M T on calibration tokens (approximate; "
                    "through_norm_relative_error per block)")
            fits = [{**fit, "applied": "fitted through the post-FFN norm (down_proj and norm gain)", **log}
                    for fit, log in zip(fits, self.through_norm.log, strict=True)]
        return {"kind": kind, "new_parameters": 0, "custom_code_needed": False, "blocks": fits}


# -- ReplaceMe-LS -----------------------------------------------------------------------------
@pruner_registry.register("replaceme_ls")
class ReplaceMeLSPruner(_ReplaceMe):
    """ReplaceMe with the closed-form least-squares transform (reference: ``lstsq``)."""

    name = "replaceme_ls"

    @dataclass
    class Options(_BlockOptions):
        # Ridge: T = (A + alpha I)^-1 B. 0 = the reference (plain least squares).
        alpha: float = 0.0
        # Diagonal T (T_jj = B_jj / (A_jj + alpha)) instead of a full d x d matrix.
        diag: bool = False

    def validate_options(self) -> None:
        super().validate_options()
        a = self.options.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise ConfigError(f"replaceme_ls alpha={a!r}; allowed: a finite number >= 0")
        if not isinstance(self.options.diag, bool):
            raise ConfigError(f"replaceme_ls diag={self.options.diag!r}; allowed: true or false")

    def check_blocks(self, blocks: list[Block]) -> None:
        for a, b in zip(blocks, blocks[1:]):
            if a.end == b.start:
                raise ConfigError(
                    f"replaceme_ls: blocks [{a.start}, {a.end}) and [{b.start}, {b.end}) touch, so the second has "
                    f"no kept layer of the original model before it; set merge_consecutive: true")

    def fit(self, adapter, selection, calibration, progress=True) -> list[tuple[Block, torch.Tensor, dict]]:
        device = adapter.embeddings().weight.device
        stats = [_MomentsWithTargetNorm(b.start - 1, b.end, adapter.hidden_size, device) for b in selection.blocks]
        # All blocks' moments in one pass over the original model (cached: an alpha/diag ablation on
        # the same block and data does no pass at all).
        stats = self.gather(adapter, calibration, stats, progress, "moments")
        fits = []
        for block, stat in zip(selection.blocks, stats):
            if stat.count == 0:
                raise NumericalError(f"{self.name}: no calibration tokens reached block [{block.start}, {block.end})")
            T = solve_linear_map(stat.A, stat.B, float(self.options.alpha), self.options.diag,
                                 what=f"{self.name} block [{block.start}, {block.end})")
            fits.append((block, T, _relative_residuals(stat, T)))
        return fits

    def apply(self, adapter, selection, replacement) -> dict:
        info = []
        for block, T, diagnostics in replacement:
            self.fold(adapter, block.start - 1, T)
            info.append({"block": [block.start, block.end], "folded_into_layer": block.start - 1,
                         "solver": "diagonal" if self.options.diag else "cholesky",
                         "alpha": float(self.options.alpha), **diagnostics})
        adapter.remove_layers(selection.removed_layers)
        return self.describe(info, diagonal=self.options.diag)


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


def _rows(arrays: dict[str, np.ndarray], index: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.asarray(arrays[name][index])).to(device)
                 for name in LinearMapRows.COLUMNS)


@torch.no_grad()
def _mean_objective(arrays, T, loss, accurate, chunk, device) -> float:
    total, count = 0.0, arrays["mlp_out"].shape[0]
    for start in range(0, count, chunk):
        m, y, h = _rows(arrays, np.arange(start, min(start + chunk, count)), device)
        total += float(transform_objective(m, y, h, T, loss, accurate).to(torch.float64).sum())
    return total / count


def train_transform(arrays: dict[str, np.ndarray], loss: str, accurate: bool, lr: float, epochs: int,
                    batch_size: int, seed: int, device, progress: bool = True, what: str = "") -> tuple[torch.Tensor, dict]:
    """Adam on T (float32, from the identity) over shuffled mini-batches of spilled token rows."""
    rows, d = arrays["mlp_out"].shape
    T = torch.eye(d, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([T], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    before = _mean_objective(arrays, T.detach(), loss, accurate, max(batch_size, 4096), device)
    steps, epoch_losses = 0, []
    for _ in tqdm(range(epochs), desc=f"{what}: training T", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(rows, generator=generator).numpy()
        total = 0.0
        for start in range(0, rows, batch_size):
            index = np.sort(order[start:start + batch_size])  # sorted: sequential reads from the spill file
            m, y, h = _rows(arrays, index, device)
            batch_loss = transform_objective(m, y, h, T, loss, accurate).mean()
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            total += float(batch_loss.detach()) * len(index)
            steps += 1
        epoch_losses.append(total / rows)
    T = T.detach()
    if not torch.isfinite(T).all():
        raise NumericalError(f"{what}: training diverged (T is not finite); lower pruner.options.lr")
    after = _mean_objective(arrays, T, loss, accurate, max(batch_size, 4096), device)
    return T, {"objective_at_identity": before, "objective_after": after, "epoch_losses": epoch_losses,
               "steps": steps, "tokens": rows}


@pruner_registry.register("replaceme_cosine")
class ReplaceMeCosinePruner(_ReplaceMe):
    """ReplaceMe with T trained by Adam on the cosine distance (reference default: ``cosine``)."""

    name = "replaceme_cosine"

    @dataclass
    class Options(_BlockOptions):
        # Objective: cosine = 1 - mean cos (reference), mse = mean squared error.
        loss: str = "cosine"
        # false: cos(M T, h_e - Y) (reference); true: cos(M T + Y, h_e) (the faithful objective).
        accurate: bool = False
        # Adam learning rate (reference 1e-4).
        lr: float = 1e-4
        # Passes over all calibration token rows (reference 10).
        epochs: int = 10
        # Token rows per Adam step (reference 1024).
        batch_size: int = 1024
        # Seed of the row shuffling.
        seed: int = 0
        # Directory for the temporary spill files of token rows; null = the system temp dir.
        spill_dir: str | None = None

    def validate_options(self) -> None:
        super().validate_options()
        o = self.options
        if o.loss not in ("cosine", "mse"):
            raise ConfigError(f"replaceme_cosine loss={o.loss!r}; allowed: cosine, mse")
        if not isinstance(o.accurate, bool):
            raise ConfigError(f"replaceme_cosine accurate={o.accurate!r}; allowed: true or false")
        if isinstance(o.lr, bool) or not isinstance(o.lr, (int, float)) or not o.lr > 0 or not math.isfinite(o.lr):
            raise ConfigError(f"replaceme_cosine lr={o.lr!r}; allowed: a positive number")
        for name in ("epochs", "batch_size"):
            v = getattr(o, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"replaceme_cosine {name}={v!r}; allowed: a positive integer")
        if isinstance(o.seed, bool) or not isinstance(o.seed, int):
            raise ConfigError(f"replaceme_cosine seed={o.seed!r}; allowed: an integer")

    def fit(self, adapter, selection, calibration, progress=True) -> list[dict]:
        """Fit, fold and remove block after block (the model is changed here, not in `apply`).

        The reference recalibrates the already-pruned model before each next block, so block k's
        rows come from the model with blocks < k already replaced: the surgery has to happen
        between fits.
        """
        o = self.options
        device = adapter.embeddings().weight.device
        fits, removed_so_far = [], 0
        alive = list(range(adapter.num_layers))  # original index of each current layer
        for block in sorted(selection.blocks):
            s, e = block.start - removed_so_far, block.end - removed_so_far  # current numbering
            what = f"{self.name} block [{block.start}, {block.end})"
            with tempfile.TemporaryDirectory(prefix="depthbench-replaceme-", dir=o.spill_dir) as tmp:
                spill = LinearMapRows(s - 1, e, adapter.hidden_size, tmp)
                if removed_so_far == 0:  # the original model: rows from its stored activations
                    self.gather(adapter, calibration, [spill], progress, f"block [{block.start}, {block.end}) rows")
                else:  # the model as pruned so far: a fresh pass
                    collect(adapter, calibration.batches, [spill], progress=progress, description=f"{what}: rows")
                arrays = spill.open()
                T, diagnostics = train_transform(arrays, o.loss, o.accurate, float(o.lr), o.epochs, o.batch_size,
                                                 o.seed, device, progress, what)
                del arrays
            self.fold(adapter, s - 1, T)
            adapter.remove_layers(range(s, e))
            # with unmerged touching blocks, the kept layer is the one before the previous block
            fits.append({"block": [block.start, block.end], "folded_into_layer": alive[s - 1],
                         "layer_index_when_folded": s - 1, "loss": o.loss, "accurate": o.accurate,
                         **diagnostics})
            removed_so_far += len(block)
            del alive[s:e]
        return fits

    def apply(self, adapter, selection, replacement) -> dict:
        return self.describe(replacement)

"""ReplaceMe where a norm sits between the MLP and the residual add (Gemma-2/3's post-FFN RMSNorm).

There the residual stream receives ``M = u / rms(u) * g``: ``u`` the down projection's output, ``g``
the norm's gain. ReplaceMe fits T on ``M`` with its own objective, unchanged, and the MLP output
must then become ``M T``:

- diagonal T: exact and free, ``M T = u / rms(u) * (g t)``; the adapter rescales the norm's gain.
- full T with ``norm_fold: linear`` (the default): an explicit linear module after the norm, inserted
  by the adapter (`ModelSurgery.insert_mlp_output_linear`); exact, but the saved model needs
  `depthbench.modeling.saving.load_pruned`. Nothing in this module is involved.
- full T with ``norm_fold: through_norm``: the norm divides every token by its own length, so no weights make
  ``RMSNorm(u P) * g'`` equal ``M T`` for all tokens. `ThroughNormFit` finds the ``P`` (folded into
  ``mlp.down_proj``) and gain ``g'`` that come closest over the calibration tokens, by Adam on
  ``||RMSNorm(u P) * g' - M T||^2``. Zero new parameters, and the directory still loads with plain
  ``from_pretrained``; the fit is not exact, and its relative error is reported with the result.

``u`` itself is not needed: ``M / g = u / sqrt(mean(u^2) + eps)`` is ``u`` up to a per-token scale,
which the norm removes (it changes only how ``eps`` enters, by a relative ``eps / mean(u^2)``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from depthbench.calibration.spill import SpillFile
from depthbench.calibration.statistics import MLP_OUT, BatchActivations, HookPoint, Statistic, collect
from depthbench.errors import NumericalError


class MlpOutputRows(Statistic):
    """Every real token's ``M_k`` (layer k's MLP output), float32, spilled to a file in ``directory``."""

    cacheable = False

    def __init__(self, layer: int, hidden_size: int, directory: str | Path):
        self.k = layer
        self.file = SpillFile(Path(directory) / f"mlp_out_{layer}.f32", (hidden_size,))

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.k, str(self.file.path))

    @property
    def count(self) -> int:
        return self.file.rows

    def hook_points(self) -> set[HookPoint]:
        return {(MLP_OUT, self.k)}

    def update(self, batch: BatchActivations) -> None:
        self.file.append(batch.tokens(batch.mlp_out(self.k), "all").to(torch.float32))

    def open(self):
        return self.file.open()


def through_norm_output(u: torch.Tensor, down: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm(u @ down) * gain``, as Gemma's norm computes it (``gain`` = ``1 + weight``)."""
    v = u @ down
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * gain


def _chunks(rows, size: int):
    for start in range(0, len(rows), size):
        yield torch.from_numpy(np.asarray(rows[start:start + size]))


def fit_through_norm(rows, gain: torch.Tensor, eps: float, T: torch.Tensor, epochs: int = 10, lr: float = 1e-3,
                     batch_size: int = 1024, seed: int = 0, device="cpu", progress: bool = False,
                     what: str = "") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(P, g')`` minimising ``sum ||RMSNorm(u P) * g' - M T||^2`` over the rows ``M`` (float32, [N, d]).

    Start: ``P = diag(g) T / c``, ``g' = c`` with ``c`` the root mean square of ``M T``, which is exact
    for tokens whose ``M T`` has that length. Then Adam (float32, shuffled mini-batches, step sizes
    ``lr`` relative to the scale of each parameter); the start is kept if training does not improve it.
    """
    g = gain.to(torch.float64).cpu()
    inv_g = torch.where(g.abs() > torch.finfo(torch.float32).tiny, 1.0 / g, torch.zeros_like(g))
    t64 = T.to(torch.float64).cpu()
    target_sq = sum(float(((m.to(torch.float64) @ t64) ** 2).sum()) for m in _chunks(rows, 8192))
    n, d = rows.shape
    if not target_sq > 0 or not math.isfinite(target_sq):
        raise NumericalError(f"{what}: M T is zero or not finite on the calibration tokens")
    c = math.sqrt(target_sq / (n * d))
    T32, inv_g32 = T.to(torch.float32).to(device), inv_g.to(torch.float32).to(device)
    down = ((g[:, None] * t64) / c).to(torch.float32).to(device).requires_grad_(True)
    new_gain = torch.full((d,), c, dtype=torch.float32, device=device, requires_grad=True)

    @torch.no_grad()
    def relative_error(p, q) -> float:
        err = 0.0
        for m in _chunks(rows, 8192):
            m = m.to(device)
            err += float(((through_norm_output(m * inv_g32, p, q, eps) - m @ T32).to(torch.float64) ** 2).sum())
        return math.sqrt(err / target_sq)

    start = (down.detach().clone(), new_gain.detach().clone())
    error_start = relative_error(*start)
    scale = float(down.detach().pow(2).mean().sqrt())
    optimizer = torch.optim.Adam([{"params": [down], "lr": lr * scale}, {"params": [new_gain], "lr": lr * c}])
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=f"{what}: fitting T through the norm", unit="epoch", disable=not progress,
                  leave=False):
        order = torch.randperm(n, generator=generator).numpy()
        for b in range(0, n, batch_size):
            m = torch.from_numpy(np.asarray(rows[np.sort(order[b:b + batch_size])])).to(device)
            with torch.enable_grad():  # folds run under no_grad
                loss = (through_norm_output(m * inv_g32, down, new_gain, eps) - m @ T32).pow(2).mean() / (c * c)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
    fitted = (down.detach(), new_gain.detach())
    if not (torch.isfinite(fitted[0]).all() and torch.isfinite(fitted[1]).all()):
        fitted, error_after = start, error_start
    else:
        error_after = relative_error(*fitted)
        if error_after > error_start:
            fitted, error_after = start, error_start
    return fitted[0].to(torch.float64), fitted[1].to(torch.float64), {
        "through_norm_relative_error_at_start": error_start,
        "through_norm_relative_error": error_after,
        "through_norm_epochs": epochs, "through_norm_tokens": n}


class ThroughNormFit:
    """How ReplaceMe (``norm_fold: through_norm``) realises a full T through a Gemma layer's post-FFN norm.

    Called at fold time with the model as it is then (so ReplaceMe-cosine's later blocks see the
    already-pruned model, as its fit does); collects layer i's MLP output rows in a partial forward
    pass (up to layer i) and fits ``(P, g')`` by `fit_through_norm`. ``log`` keeps one entry per fold.
    """

    def __init__(self, batches: list[dict], progress: bool = True, what: str = "replaceme", epochs: int = 10,
                 lr: float = 1e-3, batch_size: int = 1024, seed: int = 0, spill_dir: str | None = None):
        self.batches, self.progress, self.what = batches, progress, what
        self.epochs, self.lr, self.batch_size, self.seed, self.spill_dir = epochs, lr, batch_size, seed, spill_dir
        self.log: list[dict] = []

    def __call__(self, adapter, layer_index: int, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        what = f"{self.what} layer {layer_index}"
        eps = float(adapter.mlp_output_norm(adapter.layer(layer_index)).eps)
        device = adapter.embeddings().weight.device
        with tempfile.TemporaryDirectory(prefix="depthbench-through-norm-", dir=self.spill_dir) as tmp:
            (stat,) = collect(adapter, self.batches, [MlpOutputRows(layer_index, adapter.hidden_size, tmp)],
                              progress=self.progress, description=f"{what}: MLP output rows")
            rows = stat.open()
            down, gain, info = fit_through_norm(rows, adapter.output_norm_gain(layer_index), eps, T, self.epochs,
                                                self.lr, self.batch_size, self.seed, device, self.progress, what)
            del rows
        self.log.append({"layer_index_when_folded": layer_index, **info})
        return down, gain

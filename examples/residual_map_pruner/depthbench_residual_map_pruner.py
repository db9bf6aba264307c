"""Example plugin: remove the block of layers that changes the residual stream least, and put a least-squares
linear map of the residual stream in its place (a method that ADDS parameters, through depthbench's surgery API).

    pip install ./examples/residual_map_pruner
    depthbench pruner=example_residual_map scale=fast benchmark=none logger=none

The three stages show the three things a replacement method needs:

- **score from calibration statistics** (`statistics` / `select`): one shared forward pass fills
  ``PairwiseSimilarity(L, gap=R)``, the mean cosine between ``h_s`` and ``h_{s+R}`` over every real token; the block
  ``[s, s+R)`` with the highest cosine goes (``s >= 1``: layer ``s-1`` must exist to carry the map);
- **fit from a statistic of your own** (`fit`): `ResidualMapMoments` accumulates ``A = sum h_s^T h_s`` and
  ``B = sum h_s^T h_e`` in float64 over every real token of the ORIGINAL model (``service.original``: replayed from
  the activations the score pass stored, no second pass), and ``P = (A + ridge * tr(A)/d * I)^-1 B`` minimises
  ``sum ||h_s P - h_e||^2`` (plus the ridge term);
- **change the model through the surgery API** (`apply`): ``ModelSurgery(adapter).remove_layers`` deletes the block,
  ``insert_residual_patch(s - 1, P)`` makes the output of layer ``s-1`` become ``h_s @ P`` (an explicit d x d module,
  counted in the parameters; the saved model reloads with ``depthbench.modeling.saving.load_pruned``).

Not a published method: a template. depthbench's ``linearpatch`` is the published cousin (a Hadamard-rotated
diagonal map); ``replaceme_ls`` folds its map into the MLP instead, with zero new parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthbench.calibration.statistics import RESIDUAL, PairwiseSimilarity, Statistic
from depthbench.errors import ConfigError
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners import Pruner, Selection, option


class ResidualMapMoments(Statistic):
    """``A = sum h_s^T h_s`` and ``B = sum h_s^T h_e`` over every real calibration token, float64."""

    def __init__(self, start: int, end: int, hidden_size: int):
        self.start, self.end = start, end
        self.A = torch.zeros(hidden_size, hidden_size, dtype=torch.float64)
        self.B = torch.zeros(hidden_size, hidden_size, dtype=torch.float64)
        self.count = 0

    @property
    def key(self) -> tuple:  # equal requests (same block) are computed once and may be cached
        return (type(self).__name__, self.start, self.end)

    def hook_points(self):
        return {(RESIDUAL, self.start), (RESIDUAL, self.end)}

    def update(self, batch) -> None:
        x = batch.tokens(batch.residual(self.start), "all").cpu()  # [N, d] float64, padding dropped
        y = batch.tokens(batch.residual(self.end), "all").cpu()
        self.A += x.T @ x
        self.B += x.T @ y
        self.count += x.shape[0]


def least_squares_map(A: torch.Tensor, B: torch.Tensor, ridge: float) -> torch.Tensor:
    """``P = (A + ridge * tr(A)/d * I)^-1 B`` (float64): minimises ``sum ||x P - y||^2 + ridge tr(A)/d ||P||^2``."""
    d = A.shape[0]
    return torch.linalg.solve(A + ridge * torch.trace(A) / d * torch.eye(d, dtype=A.dtype), B)


class ExampleResidualMapPruner(Pruner):
    name = "example_residual_map"
    paper = "example plugin: most similar block bridged by a least-squares residual map"
    fit_reads_activations = True  # the score pass stores activations; fit's statistic replays them

    @dataclass
    class Options:
        ridge: float = option(1e-4, "Ridge term, relative to the mean eigenvalue tr(A)/d of the input moments.")

    def validate_options(self) -> None:
        if not self.options.ridge >= 0:
            raise ConfigError(f"example_residual_map ridge={self.options.ridge!r}; allowed: a number >= 0")

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        if not 1 <= n_remove <= num_layers - 1:
            raise ConfigError(f"example_residual_map: a block of {n_remove} layers starting at 1 or later; allowed: "
                              f"1..{num_layers - 1} of {num_layers} layers")

    def statistics(self, adapter, n_remove):
        return [PairwiseSimilarity(adapter.num_layers, gap=n_remove, tokens="all")]

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        (similarity,) = statistics
        cosines = similarity.mean_cosine().tolist()  # one per start s = 0 .. L - R
        start = max(range(1, len(cosines)), key=lambda s: cosines[s])  # first maximum, s >= 1
        return Selection(removed_layers=list(range(start, start + n_remove)),
                         scores={"metric": "mean cos(h_s, h_{s+R}) over all tokens", "values": cosines})

    def fit(self, adapter, selection, service):
        start, end = selection.removed_layers[0], selection.removed_layers[-1] + 1
        (moments,) = service.original([ResidualMapMoments(start, end, adapter.hidden_size)], "residual map moments")
        return least_squares_map(moments.A, moments.B, self.options.ridge)

    def apply(self, adapter, selection, replacement, service) -> dict:
        surgery = ModelSurgery(adapter)
        start = selection.removed_layers[0]
        surgery.remove_layers(selection.removed_layers)
        surgery.insert_residual_patch(start - 1, replacement)  # layer start-1's output h_s becomes h_s @ P
        return {"kind": "least-squares residual map after layer s-1", "after_layer": start - 1,
                "new_parameters": int(replacement.numel())}

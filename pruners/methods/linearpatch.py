"""LinearPatch (Chen et al., NeurIPS 2025): remove a contiguous block and patch the stream with ``P = R diag(d) R^T``.

Selection (the reference's, only to reproduce its numbers): the block ``[s, s+n)`` with the largest mean
cosine between ``h_s`` and ``h_{s+n}`` over ``s`` in ``[1, L-n-1]`` (layer 0 and blocks ending at L are never
chosen). The reference calls ``torch.cosine_similarity`` on ``[B, T, d]`` tensors with its default ``dim=1``,
i.e. along TOKENS, per channel: ``cos_axis: tokens`` (default) reproduces that; ``cos_axis: hidden`` takes the
usual per-token cosine over the hidden dimension. Padding is masked either way.

Patch: with R the normalised Hadamard matrix (`depthbench.pruners.hadamard`; ``insert_type: diag`` sets
R = I), on the UNPRUNED model over the calibration sequences (real tokens only, float64)

    d_c = (1/N) sum_n mean_tok|(h_e R)[n, :, c]| / mean_tok|(h_s R)[n, :, c]|

and after deleting ``[s, e)`` the output of layer s-1 becomes ``h_s P`` (``(h P) R = (h R) diag(d)``). P acts on
the whole residual stream and RMSNorm is not equivariant under a non-orthogonal P, so it does not fold
exactly into existing weights:

- ``placement: interface`` (default, exact): an explicit ``ResidualPatch`` module after layer s-1
  (`depthbench.modeling.surgery.ModelSurgery.insert_residual_patch`; d^2 parameters, counted). The saved
  directory needs `depthbench.modeling.saving.load_pruned`; plain ``from_pretrained`` fails loudly on it.
- ``placement: mlp_fold``: ``W_down(s-1) <- P W_down`` (ReplaceMe's fold with this constrained T): only
  ``M_{s-1}`` is patched; zero parameters, plain load, approximate.

Both the selection cosine and every candidate's d come from ONE pass over the original model.
The reference's optional KL distillation (not training-free) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthbench.calibration.statistics import RESIDUAL, BatchActivations, HookPoint, PairwiseSimilarity, Statistic
from depthbench.errors import ConfigError
from depthbench.modeling.saving import LOAD_INSTRUCTIONS
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.methods.compensation import ChannelMagnitudeRatios
from depthbench.pruners.hadamard import HadamardRotation, hadamard_factors
from depthbench.pruners.options import option
from depthbench.selection.blocks import Block

COS_AXES = ("tokens", "hidden")
INSERT_TYPES = ("rotate", "diag")
PLACEMENTS = ("interface", "mlp_fold")


class TokenAxisCosine(Statistic):
    """For every start s in 0..L-gap: the sum over sequences n and channels c of the cosine ALONG TOKENS
    between ``h_s[n, :, c]`` and ``h_{s+gap}[n, :, c]`` (real tokens only; a zero vector gives 0), and the
    number of (sequence, channel) pairs: ``torch.cosine_similarity(h_s, h_e)`` with its default ``dim=1``."""

    def __init__(self, num_layers: int, gap: int):
        self.num_layers, self.gap = num_layers, gap
        self.starts = list(range(0, num_layers - gap + 1))
        self.sum_cos = torch.zeros(len(self.starts), dtype=torch.float64)
        self.count = 0

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.num_layers, self.gap)

    def hook_points(self) -> set[HookPoint]:
        return {(RESIDUAL, k) for k in range(self.num_layers + 1)}

    def update(self, batch: BatchActivations) -> None:
        weights = None
        masked = {}
        for k in range(self.num_layers + 1):
            x = batch.residual(k)
            if weights is None:
                weights = batch.mask.to(x.device).to(torch.float64).unsqueeze(-1)
            masked[k] = x.to(torch.float64) * weights
        for j, s in enumerate(self.starts):
            a, b = masked[s], masked[s + self.gap]
            num = (a * b).sum(1)
            den = a.norm(dim=1) * b.norm(dim=1)
            cos = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num))
            self.sum_cos[j] += cos.clamp(-1, 1).sum().cpu()
        self.count += int(num.numel())

    def mean_cosine(self) -> torch.Tensor:
        return self.sum_cos / self.count


def patch_matrix(scale: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``P = R diag(d) R^T`` (float64; R = I when ``rotation`` is None)."""
    scale = scale.to(torch.float64)
    if rotation is None:
        return torch.diag(scale)
    r = rotation.to(torch.float64)
    return (r * scale) @ r.T


@pruner_registry.register("linearpatch")
class LinearPatchPruner(Pruner):
    name = "linearpatch"
    paper = ("Chen et al. 2025, LinearPatch: A Simple Linear Patch Revives Layer-Pruned Large Language Models "
             "(NeurIPS 2025)")

    @dataclass
    class Options:
        cos_axis: str = option("tokens", "Selection cosine: tokens = along tokens per channel (the reference's "
                                         "torch.cosine_similarity default dim=1); hidden = per token over the hidden "
                                         "dimension.")
        insert_type: str = option("rotate", "rotate = R the normalised Hadamard matrix (reference); diag = R = I "
                                            "(a per-channel scale; any hidden size).")
        placement: str = option("interface", "interface = explicit module after layer s-1 (exact; d^2 parameters; "
                                             "saved model needs depthbench.modeling.saving.load_pruned); mlp_fold = "
                                             "folded into layer s-1's MLP down projection (zero parameters, plain "
                                             "from_pretrained, approximate).")

    #: Layer-wise (``model.layerwise=true``): the cosine and every candidate's d come from the one pass over the
    #: original model; ``placement: mlp_fold`` changes layer s-1's down projection (`layers_apply_changes`).
    supports_layerwise = True

    def check_layerwise_options(self) -> None:
        if self.options.placement == "interface":
            raise ConfigError("linearpatch placement='interface' inserts a ResidualPatch module that only "
                              "depthbench's own save layout holds; model.layerwise=true saves plain transformers "
                              "checkpoints: allowed placement=mlp_fold")

    def layers_apply_changes(self, selection: Selection) -> list[int]:
        """Layer s-1 before each block: P folds into its MLP down projection (``placement: mlp_fold``)."""
        return [block.start - 1 for block in selection.blocks]

    def validate_options(self) -> None:
        for key, allowed in (("cos_axis", COS_AXES), ("insert_type", INSERT_TYPES), ("placement", PLACEMENTS)):
            value = getattr(self.options, key)
            if value not in allowed:
                raise ConfigError(f"linearpatch {key}={value!r}; allowed: {', '.join(allowed)}")

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        super().check_feasible(num_layers, n_remove)
        if n_remove > num_layers - 2:
            raise ConfigError(f"linearpatch: a block of {n_remove} layers must start at 1 or later and end before "
                              f"layer {num_layers - 1}; allowed: 1..{num_layers - 2} of {num_layers} layers")

    def check_model(self, adapter) -> None:
        if self.options.insert_type == "rotate":
            hadamard_factors(adapter.hidden_size)  # ConfigError naming the size and what is supported
        if self.options.placement == "mlp_fold" and self.options.insert_type == "rotate":
            try:
                ModelSurgery(adapter).check_exact_fold()
            except NotImplementedError as err:
                raise ConfigError(f"linearpatch placement=mlp_fold with insert_type=rotate: {err}; allowed here: "
                                  f"placement=interface, or insert_type=diag") from None

    def rotation(self, adapter) -> HadamardRotation | None:
        return HadamardRotation(adapter.hidden_size) if self.options.insert_type == "rotate" else None

    def candidate_starts(self, num_layers: int, n: int) -> list[int]:
        return list(range(1, num_layers - n))

    def statistics(self, adapter, n_remove):
        L = adapter.num_layers
        rotation = self.rotation(adapter)
        pairs = [(s, s + n_remove) for s in self.candidate_starts(L, n_remove)]
        cosine = (TokenAxisCosine(L, n_remove) if self.options.cos_axis == "tokens"
                  else PairwiseSimilarity(L, gap=n_remove, tokens="all"))
        ratios = (ChannelMagnitudeRatios(pairs) if rotation is None
                  else ChannelMagnitudeRatios(pairs, rotation, rotation.name))
        return [cosine, ratios]

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        cosine = next(s for s in statistics if isinstance(s, (TokenAxisCosine, PairwiseSimilarity)))
        ratios = next(s for s in statistics if isinstance(s, ChannelMagnitudeRatios))
        starts = self.candidate_starts(adapter.num_layers, n_remove)
        means = cosine.mean_cosine()
        values = [float(means[cosine.starts.index(s)]) for s in starts]
        best = max(range(len(starts)), key=lambda j: (values[j], -starts[j]))
        block = Block(starts[best], starts[best] + n_remove)
        scale = ratios.ratios((block.start, block.end))
        return Selection(
            removed_layers=block.layers, blocks=[block],
            scores={"metric": f"mean cosine between h_s and h_(s+n) ({self.options.cos_axis} axis); the largest wins",
                    "n": n_remove, "starts": starts, "values": values,
                    "patch_scale": {f"{block.start}-{block.end}": [float(v) for v in scale]}})

    def fit(self, adapter, selection, service) -> list[tuple[Block, torch.Tensor]]:
        """``P`` per block, from the d recorded by `select` (computed in the score pass on the original model)."""
        rotation = self.rotation(adapter)
        matrix = rotation.matrix() if rotation is not None else None
        out = []
        for block in selection.blocks:
            scale = torch.tensor(selection.scores["patch_scale"][f"{block.start}-{block.end}"], dtype=torch.float64)
            out.append((block, scale, patch_matrix(scale, matrix)))
        return out

    def apply(self, adapter, selection, replacement, service) -> dict:
        surgery = ModelSurgery(adapter)
        surgery.remove_layers(selection.removed_layers)
        patches = []
        removed_before = 0
        for block, scale, P in sorted(replacement, key=lambda item: item[0].start):
            kept = block.start - 1 - removed_before  # layer s-1 in the pruned numbering
            if self.options.placement == "interface":
                surgery.insert_residual_patch(kept, P)
            else:
                surgery.fold_into_mlp_output(kept, P)
            removed_before += len(block)
            patches.append({"block": [block.start, block.end], "after_layer": block.start - 1,
                            "after_layer_pruned_numbering": kept,
                            "scale_min": float(scale.min()), "scale_max": float(scale.max()),
                            "scale_mean": float(scale.mean())})
        rotation = self.rotation(adapter)
        info = {"type": "linear_patch", "rotation": rotation.name if rotation is not None else "identity",
                "placement": self.options.placement, "patches": patches,
                "new_parameters": adapter.hidden_size ** 2 * len(patches)
                if self.options.placement == "interface" else 0,
                "exact": self.options.placement == "interface",
                "custom_code_needed": self.options.placement == "interface"}
        if self.options.placement == "interface":
            info["loading"] = LOAD_INSTRUCTIONS
        return info

"""Prune&Comp (Chen et al., AAAI 2026): magnitude compensation after removing layers, for any layer method.

Removing the layers ``[s, e)`` feeds layer e with ``h_s`` where it used to see ``h_e``; their magnitudes
differ. Prune&Comp measures, on the model that still has the layers,

    alpha = mean_c [ (1/N) sum_n ( mean_tok |h_e[n, :, c]| / mean_tok |h_s[n, :, c]| ) ]

(per calibration sequence n and channel c, real tokens only; averaged over sequences, then channels)
and folds it into the weights, training-free. Every sub-block reads the stream through a scale-invariant
norm, so scaling the whole stream up to ``h_s`` by alpha changes nothing but its scale:

- ``fold: before`` (reference, magcomp.py): the embedding matrix and the attention / MLP output projections
  of every layer below s times alpha, so ``h'_k = alpha h_k`` for k <= s and layer e receives ``alpha h_s``.
  Refused where the embeddings are tied (it would scale the logits) or position embeddings are added.
- ``fold: after`` (default): the output projections of every layer from e on times ``1 / alpha``: the
  stream after the gap is the ``before`` model's divided by alpha, and the final norm removes that, so the
  logits are the same (up to the norms' epsilon) and tied embeddings stay untouched.

Output biases are scaled with their weights; Gemma's post-norm gains ``1 + w`` are scaled instead of the
projections (`depthbench.modeling.surgery.ModelSurgery.scale_residual_updates`). A gap that ends at the
last layer feeds nothing: it is removed without compensation and logged.

Modes (``compensate_mode``): ``iterative`` (reference) removes one layer per round, re-scoring the base
method's own criterion (its `statistics` / `select` with n = 1) on the current, compensated model each
round; ``post`` keeps the base method's set and compensates each maximal gap in ascending order on the
current model. Methods that replace the removed layers (ReplaceMe, LLM-Streamline: their ``h_e`` is already
matched) and sub-block methods are refused before any pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from depthbench.calibration.statistics import RESIDUAL, BatchActivations, HookPoint, Statistic, as_float64
from depthbench.errors import ConfigError, NumericalError
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners.base import Pruner, RemovalStage, Selection
from depthbench.selection.blocks import Block

log = logging.getLogger(__name__)

METHODS = ("none", "magnitude")
MODES = ("iterative", "post")
FOLDS = ("after", "before")


@dataclass(frozen=True)
class CompensationSettings:
    """The pruner-level setting ``compensate`` (``none`` | ``magnitude``) with ``compensate_mode`` and
    ``compensate_fold`` (keys of the ``pruner`` config node, beside ``name`` and ``options``)."""

    method: str = "none"
    mode: str = "iterative"
    fold: str = "after"

    @property
    def active(self) -> bool:
        return self.method != "none"

    def to_dict(self) -> dict:
        return {"compensate": self.method, "compensate_mode": self.mode, "compensate_fold": self.fold}


def parse_compensation(compensate: str | None = "none", mode: str | None = "iterative",
                       fold: str | None = "after") -> CompensationSettings:
    """The settings, or one `ConfigError` naming the value and what is allowed."""
    settings = CompensationSettings(compensate or "none", mode or "iterative", fold or "after")
    for key, value, allowed in (("compensate", settings.method, METHODS), ("compensate_mode", settings.mode, MODES),
                                ("compensate_fold", settings.fold, FOLDS)):
        if value not in allowed:
            raise ConfigError(f"pruner.{key}={value!r}; allowed: {', '.join(allowed)}")
    return settings


# -- the statistic ------------------------------------------------------------------------------
class ChannelMagnitudeRatios(Statistic):
    """For each pair (s, e): ``sum over sequences n of mean_tok|(h_e R)[n,:,c]| / mean_tok|(h_s R)[n,:,c]|``
    per channel c (float64, real tokens only), and the number of sequences. ``R`` is the identity
    (Prune&Comp) or an orthonormal rotation: ``rotation(h)`` returns ``h R`` in float64 (LinearPatch's
    Hadamard matrix), named by ``rotation_name`` (part of the statistics-cache key)."""

    def __init__(self, pairs, rotation: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 rotation_name: str = "identity"):
        self.pairs = [(int(s), int(e)) for s, e in pairs]
        if not self.pairs or any(not 0 <= s < e for s, e in self.pairs):
            raise ValueError(f"pairs {self.pairs}: need 0 <= s < e")
        if (rotation is None) != (rotation_name == "identity"):
            raise ValueError("a rotation needs a name other than 'identity' (it keys the statistics cache)")
        self.fixed = {"rotation": rotation}  # not a tensor attribute: not part of the cached state
        self.rotation_name = rotation_name
        self.sum_ratio: torch.Tensor | None = None
        self.count = 0

    @property
    def key(self) -> tuple:
        return (type(self).__name__, tuple(self.pairs), self.rotation_name)

    def hook_points(self) -> set[HookPoint]:
        return {(RESIDUAL, k) for pair in self.pairs for k in pair}

    def _channel_means(self, batch: BatchActivations, k: int) -> torch.Tensor:
        """[B, d] per-sequence mean over real tokens of |h_k R| (float64)."""
        x = batch.residual(k)
        mask = batch.mask.to(x.device)
        h = as_float64(x)
        rotation = self.fixed["rotation"]
        if rotation is not None:
            h = rotation(h)
        weights = mask.to(torch.float64).unsqueeze(-1)
        return (h.abs() * weights).sum(1) / weights.sum(1)

    def update(self, batch: BatchActivations) -> None:
        means = {k: self._channel_means(batch, k) for k in {k for pair in self.pairs for k in pair}}
        ratios = []
        for s, e in self.pairs:
            if bool((means[s] <= 0).any()):
                raise NumericalError(f"a channel of h_{s} is zero on every real token of a calibration sequence: "
                                     f"the magnitude ratio mean|h_{e}| / mean|h_{s}| is undefined")
            ratios.append((means[e] / means[s]).sum(0).cpu())
        batch_sum = torch.stack(ratios)
        self.sum_ratio = batch_sum if self.sum_ratio is None else self.sum_ratio + batch_sum
        self.count += int(batch.mask.shape[0])

    def state(self) -> dict[str, torch.Tensor]:
        if self.sum_ratio is None:
            raise ValueError("ChannelMagnitudeRatios: nothing collected yet")
        return super().state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sum_ratio = state["sum_ratio"].to(torch.float64)
        self.count = int(state["count"][0])

    def ratios(self, pair) -> torch.Tensor:
        """The per-channel mean ratio ``d_c`` of ``pair`` (float64 [d])."""
        if self.sum_ratio is None or self.count == 0:
            raise ValueError("ChannelMagnitudeRatios: nothing collected")
        return self.sum_ratio[self.pairs.index((int(pair[0]), int(pair[1])))] / self.count

    def alpha(self, pair) -> float:
        """Prune&Comp's scalar: the channel mean of `ratios`."""
        return float(self.ratios(pair).mean())


# -- folding --------------------------------------------------------------------------------------
def remove_and_compensate(adapter, start: int, end: int, alpha: float | None, fold: str) -> None:
    """Delete layers ``[start, end)`` (current numbering) and fold ``alpha`` (None: nothing to fold)."""
    surgery = ModelSurgery(adapter)
    if alpha is not None:
        if fold == "before":
            surgery.scale_embedding_output(alpha)
            for k in range(start):
                surgery.scale_residual_updates(k, alpha)
        else:
            for k in range(end, adapter.num_layers):
                surgery.scale_residual_updates(k, 1.0 / alpha)
    surgery.remove_layers(range(start, end))


def maximal_gaps(layers) -> list[Block]:
    """Maximal runs of consecutive layers, ascending."""
    gaps: list[Block] = []
    for k in sorted(set(layers)):
        if gaps and gaps[-1].end == k:
            gaps[-1] = Block(gaps[-1].start, k + 1)
        else:
            gaps.append(Block(k, k + 1))
    return gaps


def _checked_alpha(stat: ChannelMagnitudeRatios, pair) -> float:
    alpha = stat.alpha(pair)
    if not (alpha > 0 and torch.isfinite(torch.tensor(alpha))):
        raise NumericalError(f"Prune&Comp: alpha={alpha} for the gap {list(pair)}; expected a finite positive ratio")
    return alpha


def _compensate_gap(adapter, service, settings, start: int, end: int, original_model: bool, what: str) -> float | None:
    """alpha of ``[start, end)`` on the model as it is (current numbering), then removal and fold."""
    if end >= adapter.num_layers:
        log.warning("Prune&Comp: the gap [%d, %d) ends at the last layer, so nothing reads its output: removed "
                    "without compensation", start, end)
        remove_and_compensate(adapter, start, end, None, settings.fold)
        return None
    stat = ChannelMagnitudeRatios([(start, end)])
    stat = (service.original if original_model else service.current)([stat], what)[0]
    alpha = _checked_alpha(stat, (start, end))
    remove_and_compensate(adapter, start, end, alpha, settings.fold)
    return alpha


def compensate_post(adapter, selection, service, settings: CompensationSettings) -> dict:
    """``compensate_mode: post``: each maximal gap of the selection, ascending, measured on the current model."""
    removed = 0
    gaps = []
    for gap in maximal_gaps(selection.removed_layers):
        start, end = gap.start - removed, gap.end - removed
        alpha = _compensate_gap(adapter, service, settings, start, end, original_model=removed == 0,
                                what=f"Prune&Comp gap [{gap.start}, {gap.end})")
        gaps.append(_gap_record(gap.start, gap.end, start, end, alpha))
        removed += len(gap)
    return {**settings.to_dict(), "metric": ALPHA_METRIC, "gaps": gaps}


ALPHA_METRIC = ("alpha = mean over channels of the mean over calibration sequences of mean_tok|h_e| / mean_tok|h_s| "
                "(real tokens), on the model before the gap is removed")


def _gap_record(start, end, current_start, current_end, alpha) -> dict:
    return {"gap": [start, end], "gap_current_numbering": [current_start, current_end], "alpha": alpha,
            "skipped": None if alpha is not None else "the gap ends at the last layer: nothing reads its output"}


def compensate_iterative(pruner, adapter, first_statistics, n_remove: int, service,
                         settings: CompensationSettings):
    """``compensate_mode: iterative`` (reference): ``n_remove`` rounds; each scores the base criterion on the
    current model (the first round on the original statistics), takes the one layer the method's own
    `select` picks with n = 1, measures alpha there, removes it and folds alpha. One pass per round after
    the first serves both the criterion and every single-layer alpha. Returns the selection (original
    numbering) and the compensation record."""

    alive = list(range(adapter.num_layers))
    rounds, removed = [], []
    stats = first_statistics
    ratios = None
    for r in range(n_remove):
        depth = adapter.num_layers
        pairs = [(k, k + 1) for k in range(depth - 1)]
        if r > 0:
            requested = list(pruner.statistics(adapter, 1)) + [ChannelMagnitudeRatios(pairs)]
            gathered = service.current(requested, f"Prune&Comp round {r + 1}/{n_remove}")
            stats, ratios = gathered[:-1], gathered[-1]
        choice = pruner.select(stats, adapter, 1, service)
        if choice.removed_sub_blocks or len(choice.removed_layers) != 1:
            raise ConfigError(f"Prune&Comp iterative: {pruner.name} selected {choice.removed_layers} "
                              f"{choice.removed_sub_blocks} for one layer; it needs exactly one whole layer per round")
        (k,) = choice.removed_layers
        if k + 1 < depth:
            if ratios is None:  # first round: the original model (cached statistic, shared by every method)
                ratios = service.original([ChannelMagnitudeRatios(pairs)], "Prune&Comp magnitudes")[0]
            alpha = _checked_alpha(ratios, (k, k + 1))
        else:
            log.warning("Prune&Comp: round %d removes the last layer, so nothing reads its output: no compensation",
                        r + 1)
            alpha = None
        remove_and_compensate(adapter, k, k + 1, alpha, settings.fold)
        original = alive.pop(k)
        removed.append(original)
        rounds.append({"round": r + 1, **_gap_record(original, original + 1, k, k + 1, alpha),
                       "scores": choice.scores})
        ratios = None
    selection = Selection(removed_layers=sorted(removed), blocks=maximal_gaps(removed),
                          scores={"metric": f"{pruner.name}'s criterion re-scored on the compensated model each round",
                                  "order": removed})
    return selection, {**settings.to_dict(), "metric": ALPHA_METRIC, "rounds": rounds}


class CompensatedPruner(RemovalStage):
    """A layer-removal method with Prune&Comp on: the method's own score stage, then removal and compensation in
    one stage (``compensate``) instead of its select / fit / apply. Everything else (name, options, checks,
    service) is the method's; the method itself knows nothing of Prune&Comp."""

    stage = "compensate"

    def __init__(self, pruner: Pruner, settings: CompensationSettings):
        check_compensable(pruner, settings)
        self.pruner, self.settings = pruner, settings

    def __getattr__(self, name: str):
        return getattr(self.pruner, name)

    def check_model(self, adapter) -> None:
        self.pruner.check_model(adapter)
        ModelSurgery(adapter).check_residual_scaling(scale_embeddings=self.settings.fold == "before")

    def prune(self, adapter, calibration, n_remove: int, progress: bool = True):
        """As `Pruner.prune`, with this stage in place of select / fit / apply."""
        from depthbench.calibration.service import CalibrationService

        self.check_model(adapter)
        self.pruner.check_feasible(adapter.num_layers, n_remove)
        if isinstance(calibration, CalibrationService):
            return self.pruner.run_stages(adapter, calibration, n_remove, removal=self)
        with self.pruner.service(adapter, calibration, progress=progress) as service:
            return self.pruner.run_stages(adapter, service, n_remove, removal=self)

    def first_request(self, n_remove: int) -> int:
        return 1 if self.settings.mode == "iterative" else n_remove

    def remove(self, pruner, adapter, statistics, n_remove: int, service) -> tuple[Selection, dict]:
        if self.settings.mode == "iterative":
            return compensate_iterative(pruner, adapter, statistics, n_remove, service, self.settings)
        selection = pruner.select(statistics, adapter, n_remove, service)
        if selection.removed_sub_blocks:
            raise ConfigError(f"pruner.compensate: {pruner.name} selected sub-blocks {selection.removed_sub_blocks}; "
                              f"compensation needs whole layers")
        return selection, compensate_post(adapter, selection, service, self.settings)


def check_compensable(pruner: Pruner, settings: CompensationSettings) -> None:
    """One `ConfigError` where Prune&Comp cannot wrap ``pruner``: a method that replaces the removed layers
    (ReplaceMe, LLM-Streamline: its replacement already maps onto h_e), one that removes sub-blocks, or the
    iterative mode for a method that chooses without looking at the model."""
    if pruner.replaces_layers():
        raise ConfigError(f"pruner.compensate={settings.method!r} is for methods that only remove layers; "
                          f"{pruner.name!r} puts something in their place, which already maps onto h_e; allowed for "
                          f"it: compensate=none")
    if pruner.removes_sub_blocks():
        raise ConfigError(f"pruner.compensate={settings.method!r} needs whole-layer gaps; {pruner.name!r} with these "
                          f"options removes attention / MLP sub-blocks; allowed for it: compensate=none")
    if settings.mode == "iterative" and not pruner.uses_calibration:
        raise ConfigError(f"pruner.compensate_mode=iterative re-scores {pruner.name!r} on the compensated model after "
                          f"every removal, but {pruner.name!r} chooses without looking at the model (so its rounds "
                          f"would not reproduce its own choice); allowed for it: compensate_mode=post")

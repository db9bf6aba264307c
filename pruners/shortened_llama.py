"""Shortened LLaMA (Kim et al. 2024, arXiv 2402.02834): one-shot layer importance, PPL or Taylor+.

Both criteria score every layer once on the calibration data, order the layers by ascending importance
and remove the first R of that order (one shot: nothing is re-scored after a removal):

- ``shortened_ppl``: ``PPL_k = exp(NLL_cal)`` of the model with layer k skipped (L masked evaluations);
- ``shortened_taylor``: ``I_k = sum over the weights W of layer k (projections and both norms; no
  embeddings, final norm or head) of sum_ij |S_W,ij|``, ``S_W = sum over calibration batches of
  W * dloss/dW`` (signed, summed before the absolute value), with ``loss`` the model's own mean
  cross-entropy of the batch (labels = input ids, padding targets -100).

The "+" rule (``plus: true``): the first ``keep_first`` and last ``keep_last`` layers (4 and 2) are taken
out of the order before the first R are picked. The reference applies it to both criteria (no script
passes ``--no_plus_heuristic``); the paper names it only for Taylor. The reference's BookCorpus crops
are not available offline: both criteria use the calibration data of the run or sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthbench.errors import ConfigError
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.options import option
from depthbench.pruners.candidate_scoring import (NLLEvaluation, ScoresCandidates, candidate_nlls, check_evaluation,
                                                  check_score_samples, scoring_subset)


def plus_order(order: list[int], num_layers: int, keep_first: int, keep_last: int) -> list[int]:
    """``order`` without the first ``keep_first`` and the last ``keep_last`` layers."""
    kept = set(range(keep_first)) | set(range(num_layers - keep_last, num_layers))
    return [k for k in order if k not in kept]


def ascending_order(values: list[float]) -> list[int]:
    """Layer indices by ascending value; ties go to the lower index."""
    return sorted(range(len(values)), key=lambda k: (values[k], k))


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for the model's own loss: the input ids, -100 where the target or its context is padding
    (transformers shifts them by one inside)."""
    labels = torch.full_like(input_ids, -100)
    real = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    labels[:, 1:] = torch.where(real, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
    return labels


def taylor_importance(adapter, batches, progress: bool = True) -> list[float]:
    """``I_k`` for every decoder layer (see the module docstring): float64 sums of the signed ``W * grad``
    over batches, then of their absolute values over every ``*weight`` tensor of the layer. Gradients of
    the layers' weights only, by `torch.autograd.grad` (no ``.grad`` is written); every parameter's
    ``requires_grad`` is restored afterwards."""
    layers = list(adapter.decoder_layers())
    weights = [[p for name, p in layer.named_parameters() if name.endswith("weight")] for layer in layers]
    flat = [p for group in weights for p in group]
    every = list(adapter.model.parameters())
    before = [p.requires_grad for p in every]
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in flat]
    device = adapter.embeddings().weight.device
    try:
        for p in every:
            p.requires_grad_(False)
        for p in flat:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in tqdm(batches, desc="shortened_taylor: gradients", unit="batch", disable=not progress,
                              leave=False):
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                loss = adapter.model(input_ids=ids, attention_mask=mask, labels=lm_labels(ids, mask),
                                     use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite calibration loss in shortened_taylor")
                grads = torch.autograd.grad(loss, flat)
                with torch.no_grad():
                    for total, p, g in zip(sums, flat, grads):
                        total += p.to(torch.float64) * g.to(torch.float64)
    finally:
        for p, flag in zip(every, before):
            p.requires_grad_(flag)
    out, i = [], 0
    for group in weights:
        out.append(float(sum(sums[i + j].abs().sum() for j in range(len(group)))))
        i += len(group)
    return out


class _ShortenedLlama(Pruner):
    """The shared order, "+" rule and feasibility check; subclasses give the per-layer importance."""

    criterion = ""

    @dataclass
    class Options:
        plus: bool = option(True, "Apply the '+' rule: the first keep_first and last keep_last layers are never "
                                  "removed (the reference applies it to both criteria).")
        keep_first: int = option(4, "Layers at the start protected by the '+' rule (reference 4).")
        keep_last: int = option(2, "Layers at the end protected by the '+' rule (reference 2).")

    def validate_options(self) -> None:
        for key in ("keep_first", "keep_last"):
            value = getattr(self.options, key)
            if value < 0:
                raise ConfigError(f"{self.name} {key}={value!r}; allowed: an integer >= 0")

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        super().check_feasible(num_layers, n_remove)
        if self.options.plus:
            eligible = max(0, num_layers - self.options.keep_first - self.options.keep_last)
            if n_remove > eligible:
                raise ConfigError(
                    f"{self.name} cannot remove {n_remove} of {num_layers} layers with plus=true, keep_first="
                    f"{self.options.keep_first}, keep_last={self.options.keep_last}: only {eligible} layers are "
                    f"eligible; allowed: at most {eligible} (lower the ratio, keep_first / keep_last, or plus=false)")

    def statistics(self, adapter, n_remove):
        return []

    def importance(self, adapter, service) -> tuple[list[float], dict]:
        """The importance of every layer, and what else the selection records about how it was computed."""
        raise NotImplementedError

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        self.check_feasible(adapter.num_layers, n_remove)
        values, record = self.importance(adapter, service)
        order = ascending_order(values)
        if self.options.plus:
            order = plus_order(order, len(values), self.options.keep_first, self.options.keep_last)
        return Selection(
            removed_layers=sorted(order[:n_remove]),
            scores={"metric": self.criterion, "layers": list(range(len(values))), "values": values,
                    "order": order, **record},
        )


@pruner_registry.register("shortened_ppl")
class ShortenedPPLPruner(ScoresCandidates, _ShortenedLlama):
    name = "shortened_ppl"
    paper = ("Kim et al. 2024, Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of "
             "Retraining Methods (arXiv 2402.02834), PPL criterion")
    criterion = "PPL_k = exp(NLL_cal) of the model with layer k skipped; ascending"

    @dataclass
    class Options(NLLEvaluation, _ShortenedLlama.Options):
        pass

    def validate_options(self) -> None:
        super().validate_options()
        check_evaluation(self.name, self.options.evaluation)
        check_score_samples(self.name, self.options.score_samples)

    def importance(self, adapter, service) -> tuple[list[float], dict]:
        scoring, scored = scoring_subset(self.name, service, self.options.score_samples)
        layers = list(range(adapter.num_layers))
        nlls = candidate_nlls(scoring, layers, [], self.options.evaluation)
        return [math.exp(nlls[k]) for k in layers], scored


@pruner_registry.register("shortened_taylor")
class ShortenedTaylorPruner(_ShortenedLlama):
    name = "shortened_taylor"
    paper = ("Kim et al. 2024, Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of "
             "Retraining Methods (arXiv 2402.02834), Taylor+ criterion")
    criterion = ("I_k = sum over layer k's weights W of sum |S_W|, S_W = sum over batches of W * d(mean CE)/dW "
                 "(signed); ascending")

    @dataclass
    class Options(_ShortenedLlama.Options):
        pass

    def importance(self, adapter, service) -> tuple[list[float], dict]:
        return taylor_importance(adapter, service.batches, progress=service.progress), {}

"""Shortened LLaMA (Kim et al. 2024, arXiv 2402.02834): one-shot layer importance, PPL or Taylor+.

Both criteria score every layer once on the calibration data, order the layers by ascending importance
and remove the first R of that order (one shot: nothing is re-scored after a removal):

- ``shortened_ppl``: ``PPL_k = exp(NLL_cal)`` of the model with layer k skipped (L masked evaluations);
- ``shortened_taylor``: ``I_k = sum over the weights W of layer k (projections and both norms; no
  embeddings, final norm or head) of sum_ij |S_W,ij|``, ``S_W = sum over calibration batches of
  W * dloss/dW`` (signed, summed before the absolute value), with ``loss`` the model's own mean
  cross-entropy of the batch (labels = input ids, padding targets -100).

Accumulating ``S_W`` (``accumulator``, default ``auto``: float32 for 16-bit weights, float64 otherwise). The
sum runs over all decoder weights at once,
so its buffer is as large as the decoder: at Llama-3-8B shape in bfloat16 (15.0 GiB of weights, 13.0 GiB of
decoder weights) a float64 buffer is 52.0 GiB and, when `torch.autograd.grad` returned every gradient at
once, a further 13.0 GiB of gradients lived beside it: 95.2 GiB measured on an H200, over an 80 GB card.
Two changes bring it inside one:

- each weight's gradient is folded into its buffer by a post-accumulate-grad hook the moment backward
  produces it and is freed there, so at most one weight's gradient (and its float32 product, 0.7 GB at 8B)
  is alive, never the whole decoder's;
- the buffer is float32 (4 bytes per decoder parameter, 26.0 GiB at 8B). This loses nothing where it
  matters: a bfloat16 or float16 weight times its gradient has at most 22 significant bits and is exact in
  float32 (24), so the only rounding is the addition over the B calibration batches, bounded by
  (B - 1) * 2^-24 of the sum of the terms' magnitudes (1e-6 relative for the default 16 batches), far
  below the gaps between layers' scores that decide the order; the final absolute-value sums run in
  float64. Compensated (Kahan) summation would need a second buffer of the same size (26.0 GiB more at 8B,
  no longer inside 80 GB) for an error that does not change the order; chunking the parameters or
  offloading the buffer to host memory would cost extra passes or transfers for the same effect.

``accumulator: float64`` keeps the exact path (the scores of earlier runs bit for bit; 8 bytes per decoder
parameter, for cards with the room). ``auto`` (the default) takes float32 only where the products are exact in
it, i.e. every decoder weight is bfloat16 or float16 (the GPU case the buffer must fit); a float32 model (the CPU
default) keeps float64 sums, so its scores are those of earlier runs bit for bit.
Offloading and chunking are not implemented.

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


ACCUMULATORS = {"float32": torch.float32, "float64": torch.float64}
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def effective_accumulator(accumulator: str, weights: list[torch.Tensor]) -> str:
    """``auto``: ``float32`` where every weight is 16-bit (its products with a 16-bit gradient are exact in float32),
    else ``float64``; an explicit choice is returned as is."""
    if accumulator != "auto":
        return accumulator
    return "float32" if all(w.dtype in SIXTEEN_BIT for w in weights) else "float64"


def taylor_importance(adapter, batches, accumulator: str = "float32", progress: bool = True) -> list[float]:
    """``I_k`` for every decoder layer (see the module docstring): the signed ``W * grad`` summed over
    batches in ``accumulator`` precision, then the absolute values summed in float64 over every
    ``*weight`` tensor of the layer.

    Each weight's gradient is folded into its accumulator by a post-accumulate-grad hook as soon as
    backward has produced it, and its ``.grad`` is dropped there: at no time does a full copy of the
    decoder's gradients live beside the accumulator (why, and the float32 default, in the module
    docstring). A ``.grad`` a caller had set is put back afterwards, as is every ``requires_grad``."""
    dtype = ACCUMULATORS[accumulator]
    layers = list(adapter.decoder_layers())
    weights = [[p for name, p in layer.named_parameters() if name.endswith("weight")] for layer in layers]
    flat = [p for group in weights for p in group]
    every = list(adapter.model.parameters())
    before = [p.requires_grad for p in every]
    stashed = [p.grad for p in flat]
    sums = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in flat]
    folded = [0] * len(flat)
    device = adapter.embeddings().weight.device

    def fold_hook(i: int):
        def fold(p: torch.Tensor) -> None:
            with torch.no_grad():
                sums[i] += p.to(dtype) * p.grad.to(dtype)
            p.grad = None  # frees this weight's gradient now, before backward reaches the next layer
            folded[i] += 1
        return fold

    handles = []
    try:
        for p in every:
            p.requires_grad_(False)
        for i, p in enumerate(flat):
            p.grad = None
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(fold_hook(i)))
        with torch.enable_grad():
            for step, batch in enumerate(tqdm(batches, desc="shortened_taylor: gradients", unit="batch",
                                              disable=not progress, leave=False), start=1):
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                loss = adapter.model(input_ids=ids, attention_mask=mask, labels=lm_labels(ids, mask),
                                     use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite calibration loss in shortened_taylor")
                loss.backward(inputs=flat)
                missed = [i for i, n in enumerate(folded) if n != step]
                if missed:  # a weight outside the loss's graph, or a backward that bypassed the hooks
                    raise RuntimeError(f"shortened_taylor: {len(missed)} decoder weight(s) received no gradient "
                                       f"in calibration batch {step} (first: tensor {missed[0]} of {len(flat)})")
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in zip(flat, stashed):
            p.grad = grad
        for p, flag in zip(every, before):
            p.requires_grad_(flag)
    out, i = [], 0
    for group in weights:
        out.append(float(sum(sums[i + j].abs().sum(dtype=torch.float64) for j in range(len(group)))))
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
        accumulator: str = option("auto", "Precision of S_W's sum over calibration batches: float32 (4 bytes "
                                          "per decoder parameter, inside an 80 GB card at 8B; products of "
                                          "16-bit weights and gradients are exact in it), float64 (exact; 8 "
                                          "bytes), or auto: float32 where every decoder weight is bfloat16 / "
                                          "float16, float64 otherwise (a float32 model's scores unchanged).")

    def validate_options(self) -> None:
        super().validate_options()
        if self.options.accumulator not in ("auto", *ACCUMULATORS):
            raise ConfigError(f"{self.name} accumulator={self.options.accumulator!r}; allowed: auto, "
                              f"{', '.join(ACCUMULATORS)}")

    def importance(self, adapter, service) -> tuple[list[float], dict]:
        weights = [p for layer in adapter.decoder_layers() for n, p in layer.named_parameters() if n.endswith("weight")]
        accumulator = effective_accumulator(self.options.accumulator, weights)
        return taylor_importance(adapter, service.batches, accumulator, progress=service.progress), \
            {"accumulator": accumulator}

"""Partial-layer healing (Lu et al., ICLR 2026): full fine-tuning of the tail of the pruned model.

Trained: the LM head, the final norm and every parameter of the last ``k`` decoder layers of the
**pruned** model (``healing.layers``; 0 = norm and head only). Everything else is frozen, the input
embedding included. A model whose head is tied to its input embedding is untied first: the head gets
its own copy of the weight and ``config.tie_word_embeddings`` becomes False, so the embedding stays
bit-identical and the saved model reloads untied (V x d more parameters, recorded).

Objective: next-token cross-entropy over every predicted real token of the batch (mean). AdamW with a
linear warm-up from 0 over ``warmup_steps`` then a linear decay to 0 (transformers'
``get_linear_schedule_with_warmup``), gradient clipping. Where the model runs in 16-bit floats the
optimiser steps float32 master copies of the trained tensors and the model holds them rounded, so that
updates of lr 1e-5 are not lost to bfloat16 rounding. The validation loss (same objective, summed in
float64 over the validation windows) is measured before training, every ``eval_every`` steps and after
the last; ``select=best`` keeps the trained tensors of the lowest one in memory and restores them at the
end, ``select=last`` keeps the final ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from depthbench.healing.training_record import training_record
from depthbench.errors import ConfigError, NumericalError
from depthbench.modeling.surgery import ModelSurgery


@dataclass
class TrainableSet:
    """What partial-layer healing trains: parameter names (as in ``model.named_parameters()``) and the
    decoder layers (numbering of the pruned model)."""

    parameters: dict[str, nn.Parameter]
    layers: list[int]

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.parameters.values())


def trainable_set(adapter, layers: int) -> TrainableSet:
    """The LM head, the final norm and all parameters of the last ``layers`` decoder layers of the model
    as it is now (pruned). The head must not be tied to the embedding (`ModelSurgery.untie_output_embeddings`)."""
    if adapter.head_is_tied():
        raise RuntimeError("the LM head is tied to the input embedding: untie it first "
                           "(ModelSurgery.untie_output_embeddings)")
    n = adapter.num_layers
    if layers > n:
        raise ConfigError(f"healing.layers={layers} but the pruned model has {n} layers; allowed: 0 <= layers <= {n}")
    modules = [adapter.lm_head(), adapter.final_norm(), *(adapter.layer(i) for i in range(n - layers, n))]
    chosen = {id(p) for module in modules if module is not None for p in module.parameters()}
    parameters = {name: p for name, p in adapter.model.named_parameters() if id(p) in chosen}
    return TrainableSet(parameters=parameters, layers=list(range(n - layers, n)))


class FloatMasters:
    """float32 master copies of the trained tensors that are not float32: the optimiser steps the
    masters, the model holds them rounded to its dtype (float32 tensors are their own masters)."""

    def __init__(self, parameters: list[nn.Parameter]):
        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float()) for p in parameters]

    @property
    def masters(self) -> list[torch.Tensor]:
        return [m for _, m in self.pairs]

    def gradients_to_masters(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                p.copy_(m)


def _predicted(model, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (float32) and targets of the predicted real tokens (padding masked)."""
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    keep = mask[:, 1:].bool() & mask[:, :-1].bool()
    return logits[keep].float(), ids[:, 1:][keep]


@torch.no_grad()
def validation_loss(model, batches: list, device) -> float:
    """Mean next-token cross-entropy over every predicted token of ``batches`` (summed in float64)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in batches:
        logits, targets = _predicted(model, batch, device)
        total += F.cross_entropy(logits, targets, reduction="sum").double().cpu()
        count += int(targets.numel())
    return float(total / max(count, 1))


def _original_layers(pruned_layers: list[int], num_layers: int, removed_layers) -> list[int] | None:
    """The original indices of layers of the pruned model (None where the removed layers are unknown)."""
    if removed_layers is None:
        return None
    removed = {int(i) for i in removed_layers}
    kept = [i for i in range(num_layers + len(removed)) if i not in removed]
    return [kept[i] for i in pruned_layers]


def heal(model, adapter, text, settings, removed_layers=None, progress: bool = True, on_evaluation=None) -> dict:
    """Fine-tune the tail of ``model`` in place on ``text.batches`` (one per step), selecting the step by
    the loss on ``text.validation``; returns what the record keeps. ``removed_layers`` (original
    numbering) names the trained layers in the original numbering. ``on_evaluation(step, loss)``, if
    given, is called after each validation (tests use it to snapshot weights independently). A
    non-finite training loss stops at once (`NumericalError` naming the step)."""
    from transformers import get_linear_schedule_with_warmup

    started = time.time()
    device = next(model.parameters()).device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    embedding_flag = adapter.embeddings().weight.requires_grad
    untied = ModelSurgery(adapter).untie_output_embeddings()
    chosen = trainable_set(adapter, settings.layers)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen.parameters)
    masters = FloatMasters(list(chosen.parameters.values()))
    optimizer = torch.optim.AdamW(masters.masters, lr=settings.lr, weight_decay=settings.weight_decay)
    batches = text.batches
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps_used, len(batches))
    was_training = model.training

    def evaluate(step: int) -> float:
        model.eval()
        loss = validation_loss(model, text.validation, device)
        validation.append({"step": step, "loss": round(loss, 6)})
        if on_evaluation is not None:
            on_evaluation(step, loss)
        return loss

    curve: list[float] = []
    validation: list[dict] = []
    best_step, best_loss, best_tensors = None, math.inf, None
    tokens = 0
    evaluate(0)  # the pruned model before training: recorded, not a candidate
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        bar = tqdm(batches, desc=f"healing (last {settings.layers} layers)", unit="step", disable=not progress,
                   leave=False)
        for step, batch in enumerate(bar, 1):
            model.train()
            logits, targets = _predicted(model, batch, device)
            loss = F.cross_entropy(logits, targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NumericalError(f"healing loss is {value} at step {step} of {len(batches)}; training stopped, "
                                     "nothing was saved (try a lower healing.lr)")
            loss.backward()
            masters.gradients_to_masters()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(masters.masters, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            masters.masters_to_model()
            curve.append(value)
            tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{value:.4f}")
            if step % settings.eval_every == 0 or step == len(batches):
                loss_now = evaluate(step)
                if settings.select == "last" or loss_now < best_loss:
                    best_step, best_loss = step, loss_now
                    if settings.select == "best" and step < len(batches):
                        best_tensors = {n: p.detach().clone() for n, p in chosen.parameters.items()}
    if best_step != len(batches):  # select=best and an earlier step was better: restore its tensors
        with torch.no_grad():
            for name, p in chosen.parameters.items():
                p.copy_(best_tensors[name])
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), embedding_flag))  # the untied head: as the shared weight was
    model.train(was_training)
    seconds = time.time() - started
    return {
        "method": "partial_layers",
        "config": settings.to_dict(),
        "layers": settings.layers,
        "trained_layers": chosen.layers,
        "trained_original_layers": _original_layers(chosen.layers, adapter.num_layers, removed_layers),
        "trainable_parameters": chosen.count,
        "trainable_tensors": sorted(chosen.parameters),
        "untied_embeddings": bool(untied),
        "untie_added_parameters": untied,
        **training_record(curve, tokens, batches, seconds),
        "validation_curve": validation,
        "select": settings.select,
        "selected_step": best_step,
        "selected_validation_loss": best_loss,
    }

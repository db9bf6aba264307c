"""LoRA healing with peft: adapters on the kept layers' projections, trained, then merged into the weights.

Objective per step, over every predicted position of the batch (padding masked, mean over tokens):
``(1 - w) * next-token cross-entropy + w * KL(dense || healed)`` with ``w = distillation_weight``; the
KL term needs the dense model's logits on the same batch (a dense copy in memory: its size is recorded).
Seeds: the adapter initialisation, dropout and nothing else draw from torch's global generator, which is
seeded with ``settings.seed`` inside `torch.random.fork_rng` (the caller's generator state is restored);
the data order is fixed by the same seed in `depthbench.healing.data`.

After training the adapters are merged (W + (alpha / rank) B A) and removed: the model has exactly its
pruned architecture again, so ``save_pretrained`` / plain ``from_pretrained`` need no peft.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from depthbench.healing.training_record import training_record
from depthbench.errors import NumericalError
from depthbench.healing.settings import SCHEDULES
from depthbench.healing.targets import target_module_names, uses_conv1d


def lora_config(model, names: list[str], settings):
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(names), bias="none", fan_in_fan_out=uses_conv1d(model, names))


def attach_lora(model, adapter, settings):
    """``(peft model, target names)``: LoRA adapters (seeded with ``settings.seed``) on the selected projections."""
    from peft import get_peft_model

    names = target_module_names(adapter, settings)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers' deprecated is_gradient_checkpointing: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(settings.seed)
        peft_model = get_peft_model(model, lora_config(model, names, settings))
    return peft_model, names


def _batch_loss(model, batch, device, settings, teacher=None) -> torch.Tensor:
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    keep = mask[:, 1:].bool() & mask[:, :-1].bool()
    student = logits[keep].float()
    loss = student.new_zeros(())
    w = settings.distillation_weight
    if w < 1:
        loss = loss + (1 - w) * F.cross_entropy(student, ids[:, 1:][keep])
    if w > 0:
        with torch.no_grad():
            dense = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][keep].float()
        loss = loss + w * F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(dense, -1), log_target=True,
                                   reduction="batchmean")
    return loss


def heal(model, adapter, batches: list, settings, teacher=None, progress: bool = True) -> dict:
    """Train LoRA on ``batches`` (one per step) and merge it into ``model`` in place. Returns what the
    record keeps: budget, wall time, loss curve, target modules. A non-finite loss stops at once
    (`NumericalError` naming the step) before any weight is merged."""
    from transformers import get_scheduler

    if settings.needs_dense_model and teacher is None:
        raise ValueError("distillation_weight > 0 needs the dense model (teacher)")
    started = time.time()
    device = next(model.parameters()).device
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}  # peft freezes the base
    peft_model, names = attach_lora(model, adapter, settings)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(SCHEDULES[settings.schedule], optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=len(batches))
    curve: list[float] = []
    tokens = 0
    was_training = model.training
    peft_model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        bar = tqdm(batches, desc="healing (LoRA)", unit="step", disable=not progress, leave=False)
        for step, batch in enumerate(bar, 1):
            loss = _batch_loss(peft_model, batch, device, settings, teacher)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NumericalError(f"healing loss is {value} at step {step} of {len(batches)}; training stopped, "
                                     "nothing was saved (try a lower healing.lr)")
            loss.backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(value)
            tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{value:.4f}")
    merged = peft_model.merge_and_unload()
    assert merged is model, "peft returned another model object"
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad[name])
    model.train(was_training)
    seconds = time.time() - started
    return {
        "method": "lora",
        "config": settings.to_dict(),
        "target_modules": names,
        "trainable_parameters": sum(p.numel() for p in trainable),
        **training_record(curve, tokens, batches, seconds),
    }

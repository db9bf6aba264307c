"""LLM-Streamline (Chen et al. 2024 / ICLR 2025, arXiv 2403.19135): replace n+1 layers by one trained.

To remove n layers net, the n+1 consecutive layers ``[j, j+n+1)`` whose ends are most alike,
``s(j) = mean over all tokens of cos(h_j, h_{j+n+1})`` (``j* = argmax``, layer 0 eligible), are
replaced by ONE module trained to map ``h_{j*}`` to ``h_{j*+n+1}``; everything else is frozen.

Replacement modules (option ``replacement``):

- ``layer`` (default, the paper's main setting): a decoder layer of the model's own class,
  initialised as a copy of layer j*.
- ``ffn``: the paper's FFN variant, ``h + mlp(norm(h))`` with the MLP and its pre-norm copied from
  layer j*. It is stored as a decoder layer of the model's own class whose attention output
  projection is zero (and frozen), so the attention sub-block adds exactly nothing: the saved model
  still loads with plain ``AutoModelForCausalLM.from_pretrained``. The price is that the zero
  attention weights are stored; ``new_parameters`` counts only the trained FFN.

Training (option ``loss``): ``mse`` (reference) over every real token and dimension, with the causal
attention mask (the reference trains without one, bidirectionally, and runs causally at inference:
not copied); ``lm``: the language-modelling loss of the calibration tokens through the rest of the
frozen model (final layers, final norm, head), a simple implementation of the paper's ablation.
AdamW, linear warm-up then cosine decay to ``min_lr``, gradient clipping. The module's weights and
optimiser state are float32 and it is cast back to the model dtype afterwards; option ``precision``
sets the arithmetic: ``float32``, or ``bf16-mixed`` (matmuls in bfloat16 under ``torch.autocast``,
float32 master weights, loss and updates: the usual mixed-precision training, faster on a CPU with
bfloat16 instructions or a GPU; docs/PERFORMANCE.md times both), ``auto`` (default) = ``bf16-mixed``
for a bfloat16 model (its activations, the training pairs, are bfloat16 already, and the module
runs in bfloat16 once placed) and ``float32`` otherwise. Training pairs stay on the model's device
where they fit ``cache.activations_memory_gb``, else they are spilled to a file (`depthbench.calibration.spill`).
"""

from __future__ import annotations

import copy
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from depthbench.calibration.spill import ResidualPairSequences
from depthbench.calibration.statistics import PairwiseSimilarity
from depthbench.errors import ConfigError, NumericalError
from depthbench.measure import device_clock
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.convergence import ConvergenceLog, check_holdout, holdout_split, training_budget
from depthbench.pruners.options import option, run_seed_option
from depthbench.selection.blocks import Block, best_block


def streamline_scores(statistics, n: int) -> tuple[list[int], list[float]]:
    """Candidate starts j = 0..L-n-1 and ``s(j) = mean cos(h_j, h_{j+n+1})`` over all tokens."""
    stat = next(s for s in statistics if isinstance(s, PairwiseSimilarity) and s.key[1:] == (n + 1, "all"))
    return list(stat.starts), [float(c) for c in stat.mean_cosine()]


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up to ``lr``, then cosine decay to ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


PRECISIONS = ("auto", "float32", "bf16-mixed")


def resolve_precision(precision: str, model_dtype: torch.dtype) -> str:
    """``auto`` -> ``bf16-mixed`` for a bfloat16 model, else ``float32``; other values unchanged."""
    if precision == "auto":
        return "bf16-mixed" if model_dtype == torch.bfloat16 else "float32"
    return precision


def training_arithmetic(precision: str, device: torch.device):
    """The context the module's forward passes run in: bfloat16 autocast for ``bf16-mixed``."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_bf16_autocast(device: torch.device) -> str | None:
    """None where bfloat16 autocast works on ``device``, else why not (torch raises on a CUDA device
    without bfloat16, and warns and turns autocast off on a device type without it)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with training_arithmetic("bf16-mixed", device):
                pass
    except (RuntimeError, UserWarning) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


@pruner_registry.register("llm_streamline")
class LLMStreamlinePruner(Pruner):
    name = "llm_streamline"
    paper = "Chen et al. 2024, Streamlining Redundant Layers to Compress Large Language Models (arXiv 2403.19135)"
    fit_reads_activations = True
    #: Layer-wise (``model.layerwise=true``): the training pairs come from one pass over the original model, the
    #: module starts as a copy of layer j* (`CalibrationService.layer_in_memory`) and takes its place
    #: (`layers_apply_changes`); ``loss: lm`` runs the rest of the model, so it is refused.
    supports_layerwise = True

    @dataclass
    class Options:
        replacement: str = option("layer", "Module replacing layers [j*, j*+n+1): layer = a copy of layer j* (paper "
                                           "default); ffn = h + mlp(norm(h)) from layer j*, stored as a layer whose "
                                           "attention output is zero.")
        loss: str = option("mse", "Training loss: mse = ||module(h_j*) - h_{j*+n+1}||^2 over real tokens (paper "
                                  "default); lm = next-token loss through the rest of the frozen model.")
        lr: float = option(2e-4, "AdamW peak learning rate (reference 2e-4).")
        weight_decay: float = option(1e-3, "AdamW weight decay (reference 1e-3).")
        min_lr: float = option(5e-5, "Floor of the cosine decay (reference 5e-5).")
        warmup_steps: int = option(5, "Linear warm-up steps before the cosine decay.")
        max_grad_norm: float = option(5.0, "Gradient clipping: max global L2 norm (reference 5).")
        epochs: int = option(1, "Passes over the training sequences (reference: 1 epoch; this code used 4 before "
                                "issue 15). The reference's sequences are packed 2048-token windows: set "
                                "calibration.packing=true (and calibration.seq_len) for that; the default "
                                "calibration is per-document, shared with the other methods' one pass.")
        max_steps: int | None = option(None, "Exactly this many optimiser steps, overriding epochs (null = epochs "
                                             "decide).")
        batch_size: int = option(8, "Sequences per optimiser step.")
        seed: int = run_seed_option("Seed of the sequence shuffling and of the held-out split.")
        holdout: float = option(0.1, "Fraction of the calibration sequences held out of training (seeded, "
                                     "disjoint) for the held-out objective curve and the best-state choice; 0 = "
                                     "train on all (then keep_best must be false).")
        eval_every: int = option(0, "Optimiser steps between two held-out evaluations (0 = 10 evaluations over the "
                                    "training).")
        keep_best: bool = option(True, "Keep the state with the lowest held-out objective (the initial copy "
                                       "included), as the reference keeps its best checkpoint; false = the last "
                                       "state (this code before issue 15).")
        precision: str = option("auto", "Arithmetic of the training: float32; bf16-mixed (bfloat16 autocast, "
                                        "float32 master weights, loss and AdamW state); auto = bf16-mixed for a "
                                        "bfloat16 model, float32 otherwise.")
        spill_dir: str | None = option(None, "Directory for the temporary spill files of training pairs where they "
                                             "do not fit cache.activations_memory_gb (then they stay on the "
                                             "model's device); null = the system temp dir.")

    def validate_options(self) -> None:
        o = self.options
        if o.replacement not in ("layer", "ffn"):
            raise ConfigError(f"llm_streamline replacement={o.replacement!r}; allowed: layer, ffn")
        if o.precision not in PRECISIONS:
            raise ConfigError(f"llm_streamline precision={o.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if o.loss not in ("mse", "lm"):
            raise ConfigError(f"llm_streamline loss={o.loss!r}; allowed: mse, lm")
        for name in ("lr", "min_lr", "weight_decay", "max_grad_norm"):
            v = getattr(o, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"llm_streamline {name}={v!r}; allowed: a finite number >= 0")
        if not o.lr > 0 or o.min_lr > o.lr:
            raise ConfigError(f"llm_streamline lr={o.lr!r}, min_lr={o.min_lr!r}; allowed: 0 < lr and min_lr <= lr")
        for name, low in (("epochs", 1), ("batch_size", 1), ("warmup_steps", 0)):
            if getattr(o, name) < low:
                raise ConfigError(f"llm_streamline {name}={getattr(o, name)!r}; allowed: an integer >= {low}")
        if o.max_steps is not None and o.max_steps < 1:
            raise ConfigError(f"llm_streamline max_steps={o.max_steps!r}; allowed: null or a positive integer")
        check_holdout(self.name, o.holdout)
        if o.eval_every < 0:
            raise ConfigError(f"llm_streamline eval_every={o.eval_every!r}; allowed: an integer >= 0 (0 = 10 "
                              f"evaluations over the training)")
        if o.keep_best and o.holdout == 0:
            raise ConfigError("llm_streamline keep_best=true needs held-out sequences to choose by; allowed: "
                              "holdout > 0 or keep_best=false")

    def check_model(self, adapter) -> None:
        """bf16-mixed needs bfloat16 autocast on the model's device: checked before calibration."""
        weight = adapter.embeddings().weight
        if resolve_precision(self.options.precision, weight.dtype) != "bf16-mixed":
            return
        problem = check_bf16_autocast(weight.device)
        if problem:
            raise ConfigError(f"llm_streamline precision={self.options.precision!r} trains with bfloat16 autocast, "
                              f"which {weight.device} does not support ({problem}); use "
                              f"pruner.options.precision=float32")

    def check_layerwise_options(self) -> None:
        if self.options.loss == "lm":
            raise ConfigError("llm_streamline loss='lm' trains through every layer after the replaced ones, the "
                              "final norm and the head, which needs the whole model in memory; with "
                              "model.layerwise=true allowed: loss=mse")

    def layers_apply_changes(self, selection: Selection) -> list[int]:
        """Layer j*: the trained module takes its place (`apply` reads its dtype and device there)."""
        return [self.replaced_range(selection)[0]]

    # -- score and select ------------------------------------------------------------------
    def statistics(self, adapter, n_remove):
        return [PairwiseSimilarity(adapter.num_layers, gap=n_remove + 1, tokens="all")]

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        starts, s = streamline_scores(statistics, n_remove)
        replaced = best_block([-v for v in s], starts, n_remove + 1)  # argmax s(j), first on ties
        removed = Block(replaced.start + 1, replaced.end)
        return Selection(
            removed_layers=removed.layers,
            blocks=[removed],
            scores={"metric": "s(j) = mean over all tokens of cos(h_j, h_{j+n+1}); j* = argmax",
                    "n": n_remove, "starts": starts, "values": s,
                    "replaced_range": [replaced.start, replaced.end]},
        )

    # -- the replacement module ------------------------------------------------------------
    def initial_module(self, adapter, layer: nn.Module) -> nn.Module:
        """A float32 copy of ``layer`` (j*), with only the parts that this replacement trains left trainable."""
        module = copy.deepcopy(layer).to(torch.float32)
        for p in module.parameters():
            p.requires_grad_(True)
        if self.options.replacement == "ffn":
            surgery = ModelSurgery(adapter)
            surgery.zero_attention_output(module)
            surgery.set_attention_trainable(module, False)
        module.train()
        return module

    # -- fit -------------------------------------------------------------------------------
    @staticmethod
    def replaced_range(selection: Selection) -> tuple[int, int]:
        """``[j*, j*+n+1)``: the removed block [j*+1, j*+n+1) and layer j*, where the trained module goes."""
        (removed,) = selection.blocks
        return removed.start - 1, removed.end

    def fit(self, adapter, selection, service) -> dict:
        o = self.options
        j, end = self.replaced_range(selection)
        calibration, progress = service.calibration, service.progress
        device = adapter.embeddings().weight.device
        precision = resolve_precision(o.precision, adapter.embeddings().weight.dtype)
        width = max(int(b["input_ids"].shape[1]) for b in calibration.batches)
        with service.layer_in_memory(j) as layer:  # layer-wise: read from the checkpoint for the copy only
            module = self.initial_module(adapter, layer).to(device)
        trainable = _trainable_parameters(module)
        sequences = calibration.n_samples
        with service.rows_storage(ResidualPairSequences.storage_bytes(sequences, width, adapter.hidden_size),
                                  "depthbench-streamline-", o.spill_dir) as storage:
            spill = ResidualPairSequences(j, end, adapter.hidden_size, width, storage, capacity=sequences)
            service.original([spill], "training pairs")
            data = spill.open()
            started = device_clock(device)
            input_ids = _padded_ids(calibration.batches, width) if o.loss == "lm" else None
            loss_fn = self._mse_loss if o.loss == "mse" else self._lm_loss(adapter, end, input_ids)
            frozen = [p for p in adapter.model.parameters() if p.requires_grad]
            for p in frozen:  # nothing of the model itself trains (and no gradients pile up there)
                p.requires_grad_(False)
            try:
                history = self._train(adapter, module, trainable, data, loss_fn, device, precision, progress,
                                      calibration.n_tokens)
                mse_before = history.pop("mse_initial")
                mse_after = _mean_mse(adapter, module, data, o.batch_size, device, precision)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            history.update(training_rows=storage.where, training_seconds=device_clock(device) - started)
            del data
        for p in module.parameters():
            if not torch.isfinite(p).all():
                raise NumericalError(f"{self.name}: training diverged (non-finite weights); lower pruner.options.lr")
        return {"module": module, "replaced_range": [j, end], "mse_before": mse_before, "mse_after": mse_after,
                "trained_parameters": sum(p.numel() for p in trainable), "precision": precision, **history}

    @staticmethod
    def _mse_loss(adapter, module, x, target, mask, index):
        out = adapter.layer_forward(module, x, mask)
        real = mask.bool()
        return ((out.float() - target) ** 2)[real].mean()

    def _lm_loss(self, adapter, end, input_ids):
        rest = list(adapter.decoder_layers())[end:]

        def loss(adapter_, module, x, target, mask, index):
            h = adapter.layer_forward(module, x, mask).to(adapter.embeddings().weight.dtype)
            for layer in rest:
                h = adapter.layer_forward(layer, h, mask)
            logits = adapter.lm_head()(adapter.final_norm()(h))
            ids = input_ids[index, : x.shape[1]].to(x.device)
            keep = mask[:, 1:].bool() & mask[:, :-1].bool()
            return F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep])

        return loss

    def _held_out(self, adapter, module, data, index, loss_fn, device, precision) -> float | None:
        """The training objective on the held-out sequences ``index`` (per real token for mse, per predicted
        token for lm; float64 sums), None where nothing is held out."""
        if not len(index):
            return None
        was_training = module.training
        module.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(index), self.options.batch_size):
                rows = index[start:start + self.options.batch_size]
                x, target, mask = _load(data, rows, device)
                with training_arithmetic(precision, device):
                    loss = loss_fn(adapter, module, x, target, mask, rows)
                weight = int(mask.sum()) if self.options.loss == "mse" else int((mask[:, 1:] * mask[:, :-1]).sum())
                total += float(loss.to(torch.float64)) * weight
                count += weight
        module.train(was_training)
        return total / max(count, 1)

    def _train(self, adapter, module, trainable, data, loss_fn, device, precision, progress,
               calibration_tokens: int) -> dict:
        o = self.options
        n_all = data["input"].shape[0]
        train_rows, held_rows = holdout_split(n_all, o.holdout, o.seed)
        n_seq = len(train_rows)
        steps_per_epoch = math.ceil(n_seq / o.batch_size)
        total = o.epochs * steps_per_epoch if o.max_steps is None else o.max_steps
        interval = o.eval_every if o.eval_every > 0 else max(1, math.ceil(total / 10))
        # The fused kernel (CPU and CUDA): the same AdamW update in one kernel per step instead of ~10
        # per parameter tensor; 2.5x faster steps on 2 CPU cores for a SmolLM2 layer.
        fused = all(p.device.type in ("cpu", "cuda") for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=o.lr, weight_decay=o.weight_decay, fused=fused or None)
        generator = torch.Generator().manual_seed(o.seed)
        mse_initial = _mean_mse(adapter, module, data, o.batch_size, device, precision)
        curve = ConvergenceLog(self.name)

        def state():
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

        def held_out():
            return self._held_out(adapter, module, data, held_rows, loss_fn, device, precision)

        # The exact training objective (a forward pass over the training sequences) only where nothing is
        # held out and it is what worse_than_initial is judged on; the curve's later training entries are
        # the mean mini-batch losses since the previous record.
        def exact_train():
            return None if len(held_rows) else self._held_out(adapter, module, data, train_rows, loss_fn, device,
                                                              precision)

        curve.record(0, exact_train(), held_out(), state)
        losses, step, training_tokens, running, running_n = [], 0, 0, 0.0, 0
        bar = tqdm(total=total, desc=f"{self.name}: training", unit="step", disable=not progress, leave=False)
        while step < total:
            order = train_rows[torch.randperm(n_seq, generator=generator).numpy()]
            for start in range(0, n_seq, o.batch_size):
                if step >= total:
                    break
                index = np.sort(order[start:start + o.batch_size])
                x, target, mask = _load(data, index, device)
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine(step, total, o.warmup_steps, o.lr, o.min_lr)
                with training_arithmetic(precision, device):
                    loss = loss_fn(adapter, module, x, target, mask, index)
                if not torch.isfinite(loss):
                    raise NumericalError(f"{self.name}: training loss became non-finite at step {step}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, o.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
                training_tokens += int(mask.sum())
                running, running_n = running + losses[-1], running_n + 1
                if step % interval == 0 or step == total:
                    curve.record(step, running / running_n, held_out(), state)
                    running, running_n = 0.0, 0
                bar.update(1)
        bar.close()
        convergence = curve.summary(o.keep_best, final_train=exact_train())
        if o.keep_best:
            module.load_state_dict(curve.best_state)
        module.eval()
        held_out_tokens = int(torch.as_tensor(data["mask"][held_rows]).sum()) if len(held_rows) else 0
        return {"mse_initial": mse_initial, "steps": step, "sequences": n_seq, "held_out_sequences": len(held_rows),
                "loss_first_step": losses[0], "loss_last_step": losses[-1], "convergence": convergence,
                "budget": training_budget(calibration_tokens, training_tokens, step, step / steps_per_epoch,
                                          held_out_tokens)}

    # -- apply -----------------------------------------------------------------------------
    def apply(self, adapter, selection, replacement, service) -> dict:
        j, end = replacement["replaced_range"]
        reference = adapter.layer(j)
        dtype = next(reference.parameters()).dtype
        device = next(reference.parameters()).device
        requires_grad = next(reference.parameters()).requires_grad
        module = replacement["module"].to(device=device, dtype=dtype)
        for p in module.parameters():  # as the rest of the model (the ffn variant's attention included)
            p.requires_grad_(requires_grad)
        module.eval()
        stored = sum(p.numel() for p in module.parameters())
        surgery = ModelSurgery(adapter)
        surgery.replace_layer(j, module)
        surgery.remove_layers(selection.removed_layers)
        kind = ("decoder layer initialised from layer j*" if self.options.replacement == "layer" else
                "FFN h + mlp(norm(h)) from layer j*, stored as a decoder layer with zero attention output")
        return {
            "kind": kind,
            "replacement": self.options.replacement,
            "loss": self.options.loss,
            "replaced_range": [j, end],
            "replaced_layers": list(range(j, end)),
            "initialised_from_layer": j,
            "placed_at_layer": j,
            "new_parameters": replacement["trained_parameters"],
            "stored_parameters": stored,
            "mse_before_training": replacement["mse_before"],
            "mse_after_training": replacement["mse_after"],
            "precision": replacement["precision"],
            "steps": replacement["steps"],
            "sequences": replacement["sequences"],
            "loss_first_step": replacement["loss_first_step"],
            "loss_last_step": replacement["loss_last_step"],
            "held_out_sequences": replacement["held_out_sequences"],
            "training_rows": replacement["training_rows"],
            "training_seconds": replacement["training_seconds"],
            "convergence": replacement["convergence"],
            "budget": replacement["budget"],
        }


def _load(data, index: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mini-batch of sequences, cut to its longest real sequence (right padding)."""
    mask = torch.as_tensor(data["mask"][index])
    width = max(int(mask.sum(1).max()), 1)
    x = torch.as_tensor(data["input"][index, :width]).to(device)
    target = torch.as_tensor(data["target"][index, :width]).to(device)
    return x, target, mask[:, :width].to(device=device, dtype=torch.long)


@torch.no_grad()
def _mean_mse(adapter, module, data, batch_size: int, device, precision: str) -> float:
    """MSE of ``module`` (in the training's arithmetic) over every real token and dimension of the
    spilled pairs (float64 sums)."""
    total, count = 0.0, 0
    n_seq = data["input"].shape[0]
    for start in range(0, n_seq, batch_size):
        x, target, mask = _load(data, np.arange(start, min(start + batch_size, n_seq)), device)
        with training_arithmetic(precision, device):
            out = adapter.layer_forward(module, x, mask)
        real = mask.bool()
        diff = out[real].to(torch.float64) - target[real].to(torch.float64)
        total += float((diff * diff).sum())
        count += diff.numel()
    return total / count


def _padded_ids(batches, width: int) -> torch.Tensor:
    rows = []
    for b in batches:
        ids = torch.zeros(b["input_ids"].shape[0], width, dtype=torch.long)
        ids[:, : b["input_ids"].shape[1]] = b["input_ids"]
        rows.append(ids)
    return torch.cat(rows)

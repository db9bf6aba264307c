"""The ``healing`` config group, parsed and checked before any weights are read.

``healing=none`` (default) leaves the pruned model as it is. ``healing=lora`` trains LoRA adapters on the
attention and MLP projections of the kept layers for a fixed budget (``steps``, or ``tokens`` rounded up
to whole steps of ``batch_size`` x ``seq_len`` tokens) and merges them into the weights.
``healing=partial_layers`` (Lu et al., ICLR 2026) fine-tunes the LM head, the final norm and the last
``layers`` decoder layers of the pruned model in full, everything else frozen
(`depthbench.healing.partial_layers`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Union

from omegaconf import DictConfig, OmegaConf

from depthbench.errors import ConfigError

Number = Union[int, float]  # a YAML integer stays an integer (the resolved config and its hash unchanged)

NAMES = ("none", "lora", "partial_layers")
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
SELECTIONS = ("best", "last")


class _StepBudget:
    """The budget of a healing mode: ``steps``, or ``tokens`` rounded up to whole batches."""

    @property
    def num_steps(self) -> int:
        """Optimiser steps: ``steps``, or ``tokens`` rounded up to whole batches."""
        if self.tokens is not None:
            return math.ceil(self.tokens / self.tokens_per_step)
        return int(self.steps)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class LoraSettings(_StepBudget):
    """``healing=lora``: every key of ``healing`` (the schema of conf/healing/lora*.yaml)."""

    name: str = "lora"
    targets: tuple[str, ...] = ("attention", "mlp")
    target_modules: tuple[str, ...] | None = None
    rank: int = 8
    alpha: Number = 16
    dropout: float = 0.05
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    steps: int | None = 100
    tokens: int | None = None
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    distillation_weight: float = 0.0

    @property
    def needs_dense_model(self) -> bool:
        return self.distillation_weight > 0

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        out["targets"] = list(self.targets)
        out["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        return {"name": "lora", **out, "num_steps": self.num_steps, "tokens_per_step": self.tokens_per_step}


@dataclass(frozen=True)
class PartialLayerSettings(_StepBudget):
    """``healing=partial_layers``: every key of ``healing`` (the schema of conf/healing/partial_layers.yaml)."""

    name: str = "partial_layers"
    layers: int = 3              # k: the last k decoder layers of the pruned model are trained (0: norm + head)
    lr: float = 1e-5             # AdamW peak learning rate
    warmup_steps: int = 100      # linear warm-up from 0, then linear decay to 0 (capped at steps - 1)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    steps: int | None = 250
    tokens: int | None = None
    batch_size: int = 4
    seq_len: int = 256
    val_windows: int = 32        # held-out windows of the training text for checkpoint selection
    eval_every: int = 25         # validation loss every this many steps (and after the last)
    select: str = "best"         # best: the step with the lowest validation loss; last: the final weights
    seed: int = 0

    needs_dense_model = False

    @property
    def warmup_steps_used(self) -> int:
        """The warm-up actually run: ``warmup_steps``, capped so the last step trains at a learning rate > 0."""
        return min(self.warmup_steps, self.num_steps - 1)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        return {"name": "partial_layers", **out, "num_steps": self.num_steps, "tokens_per_step": self.tokens_per_step,
                "warmup_steps_used": self.warmup_steps_used}


@dataclass(frozen=True)
class NoHealing:
    """``healing=none``: the pruned model is the run's result."""

    name: str = "none"


SETTINGS = {"lora": LoraSettings, "partial_layers": PartialLayerSettings}


def _plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


def healing_settings(cfg) -> LoraSettings | PartialLayerSettings | None:
    """``cfg`` is the ``healing`` group (or None): None for ``healing=none``, else the checked settings."""
    values = _plain(cfg) if cfg is not None else {"name": "none"}
    name = values.pop("name", None)
    if name not in NAMES:
        raise ConfigError(f"healing.name={name!r}; allowed: {', '.join(NAMES)}")
    if name == "none":
        if values:
            raise ConfigError(f"healing=none takes no options; got {', '.join(sorted(values))}")
        return None
    kind = SETTINGS[name]
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown healing option(s) {', '.join(unknown)} for healing={name}; allowed: "
                          f"{', '.join(sorted(known))}")
    if kind is PartialLayerSettings:
        settings = PartialLayerSettings(**values)
        _check_partial(settings)
        return settings
    for key in ("targets", "target_modules"):
        if values.get(key) is not None:
            if isinstance(values[key], str):
                values[key] = [values[key]]
            values[key] = tuple(str(v) for v in values[key])
    settings = LoraSettings(**values)
    _check(settings)
    return settings


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"healing.{name}={value!r}; allowed: an integer >= {minimum}")


def _number(name: str, value, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"healing.{name}={value!r}; allowed: a number in {interval}")


def _check(s: LoraSettings) -> None:
    from depthbench.healing.targets import PARTS

    bad = [t for t in s.targets if t not in PARTS]
    if not s.targets or bad:
        raise ConfigError(f"healing.targets={list(s.targets)!r}; allowed: a non-empty subset of {', '.join(PARTS)}")
    if s.target_modules is not None and not s.target_modules:
        raise ConfigError("healing.target_modules=[] selects nothing; use null (every projection of healing.targets) "
                          "or projection names")
    _integer("rank", s.rank, 1)
    _number("alpha", s.alpha, 0, low_open=True)
    _number("dropout", s.dropout, 0, 1)
    _number("lr", s.lr, 0)
    if s.schedule not in SCHEDULES:
        raise ConfigError(f"healing.schedule={s.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    _integer("warmup_steps", s.warmup_steps, 0)
    _number("weight_decay", s.weight_decay, 0)
    if s.max_grad_norm is not None:
        _number("max_grad_norm", s.max_grad_norm, 0, low_open=True)
    _number("distillation_weight", s.distillation_weight, 0, 1, high_open=False)
    _check_budget(s)
    if s.warmup_steps >= s.num_steps:
        raise ConfigError(f"healing.warmup_steps={s.warmup_steps} leaves no training after warm-up in "
                          f"{s.num_steps} steps; allowed: 0 <= warmup_steps < steps")


def _check_partial(s: PartialLayerSettings) -> None:
    _integer("layers", s.layers, 0)
    _number("lr", s.lr, 0)
    _integer("warmup_steps", s.warmup_steps, 0)
    _number("weight_decay", s.weight_decay, 0)
    if s.max_grad_norm is not None:
        _number("max_grad_norm", s.max_grad_norm, 0, low_open=True)
    _integer("val_windows", s.val_windows, 1)
    _integer("eval_every", s.eval_every, 1)
    if s.select not in SELECTIONS:
        raise ConfigError(f"healing.select={s.select!r}; allowed: {', '.join(SELECTIONS)}")
    _check_budget(s)


def _check_budget(s) -> None:
    """The step budget and the windows (shared by every healing mode)."""
    _integer("batch_size", s.batch_size, 1)
    _integer("seq_len", s.seq_len, 2)
    _integer("seed", s.seed, 0)
    if s.tokens is not None:
        if s.steps is not None:
            raise ConfigError(f"healing.steps={s.steps} and healing.tokens={s.tokens} are both set; give one budget "
                              "(e.g. healing.tokens=... healing.steps=null)")
        _integer("tokens", s.tokens, 1)
    elif s.steps is None:
        raise ConfigError("healing.steps and healing.tokens are both null; set one budget (steps >= 1)")
    else:
        _integer("steps", s.steps, 1)


def check_healing(cfg) -> LoraSettings | PartialLayerSettings | None:
    """Everything about ``cfg.healing`` that needs no weights: the options, and, when the model's config
    can be read without weights, LoRA's target modules against its family or the number of layers
    ``partial_layers`` trains against its depth."""
    settings = healing_settings(cfg.get("healing"))
    if isinstance(settings, LoraSettings):
        from depthbench.healing.targets import check_targets_for_model

        check_targets_for_model(settings, cfg.model)
    elif isinstance(settings, PartialLayerSettings) and settings.layers > 1:
        from depthbench.modeling.loading import num_layers_of

        model = cfg.get("model") or {}
        if model.get("name_or_path") or model.get("gguf"):
            check_partial_depth(settings, num_layers_of(model))
    return settings


def check_partial_depth(settings: PartialLayerSettings, num_layers: int | None) -> None:
    """``healing.layers`` must leave layers to prune: at most L - 1 of a model of L layers (the pruned
    model's own depth is checked again when healing starts)."""
    if num_layers is not None and settings.layers > num_layers - 1:
        raise ConfigError(f"healing.layers={settings.layers} but the model has {num_layers} layers, at least one "
                          f"of which is pruned; allowed: 0 <= layers <= {num_layers - 1}")

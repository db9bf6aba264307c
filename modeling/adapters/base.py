"""The adapter interface: architecture access only. Where a family keeps its decoder layers, MLPs, norms,
projections, embeddings and head; hook points to observe activations; running one layer standalone;
parameter counts; which submodules make an attention / MLP sub-block (units); and `skipping`, a temporary
view of the model with units skipped (for scoring candidates; no weight changes).

Methods (pruners, calibration hooks) talk to a `ModelAdapter`, never to ``model.model.layers`` directly, so
supporting a new architecture is one adapter file and a test: a family implements `stored_layers`,
`set_stored_layers`, `mlp`, the projections and norms, `sub_block_stand_ins` and `layer_forward`;
skipping and observation are generic. Lasting changes to the model (removing layers or units, replacing a
layer, folding or inserting linear maps, scaling the residual stream) are `depthbench.modeling.surgery`,
which asks the adapter where things are and is the same for every family.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from depthbench.errors import ConfigError
from depthbench.modeling.modules import IdentityStandIn, NormThenLinear, PassThrough, ZeroOutput
from depthbench.modeling.units import Unit, UnitLike, normalize_units
from depthbench.registry import Registry


class ModelAdapter(ABC):
    """Wraps one causal LM and exposes the pieces depth pruning needs."""

    #: Human-readable family name, used in error messages and metadata.
    family: str = ""
    #: ``config.model_type`` values this adapter handles.
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # -- structure -------------------------------------------------------------------------
    @abstractmethod
    def stored_layers(self) -> nn.ModuleList:
        """The model's own list of decoder layers (what a family implements)."""

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers that run, in order; layer k maps h_k to h_{k+1}. Outside `skipping`, the
        model's own list; inside, the layers not skipped, numbered as in the model without the skipped
        layers (so `num_layers`, `layer`, the observers and every index refer to that model)."""
        views = _SKIP_VIEWS.get(self.model)
        return views[-1] if views else self.stored_layers()

    def skipping_active(self) -> bool:
        """Whether a `skipping` context of this model is open (surgery is refused there)."""
        return bool(_SKIP_VIEWS.get(self.model))

    @abstractmethod
    def mlp(self, layer: nn.Module) -> nn.Module:
        """The layer's MLP; its output is M_k, before the residual add."""

    @abstractmethod
    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        """The MLP's last linear map (down projection), into which a ReplaceMe transform folds."""

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm after the last decoder layer (h_L is taken before it)."""

    @abstractmethod
    def embeddings(self) -> nn.Embedding:
        ...

    def logits_from_residual(self, h_last: torch.Tensor) -> torch.Tensor:
        """The model's logits from ``h_L`` (the last layer's output): final norm, head, and the final logit
        soft-capping of families that have it (Gemma-2/3's ``final_logit_softcapping``), as the model's own
        forward computes them."""
        norm, head = self.final_norm(), self.lm_head()
        norm_params = list(norm.parameters())
        x = norm(h_last.to(norm_params[0].device if norm_params else _device_of(head)))
        logits = head(x.to(_device_of(head)))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @abstractmethod
    def lm_head(self) -> nn.Module:
        ...

    #: True where nothing sits between the MLP output projection and the residual add, so a
    #: linear map on the MLP output folds exactly into that projection.
    mlp_output_is_residual_update: bool = True
    #: Why the fold is not exact where ``mlp_output_is_residual_update`` is False (for the error).
    inexact_fold_reason: str = "the MLP output does not feed the residual directly"

    #: The attribute path, inside a decoder layer, of a norm between the MLP output projection and the residual
    #: add (Gemma-2/3's ``post_feedforward_layernorm``), or ``None`` where the projection feeds the residual
    #: directly. Surgery may wrap that norm with a linear module after it (`NormThenLinear`).
    mlp_output_norm_name: str | None = None
    #: A norm's per-dimension gain is ``weight + norm_weight_offset`` (Gemma's RMSNorm scales by ``1 + weight``).
    norm_weight_offset: float = 0.0

    def mlp_output_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm between the MLP output projection and the residual add (`mlp_output_norm_name`), or
        ``None`` where the projection feeds the residual directly."""
        if self.mlp_output_norm_name is None:
            return None
        module = layer.get_submodule(self.mlp_output_norm_name)
        return module.norm if isinstance(module, NormThenLinear) else module

    def mlp_output_linear(self, layer: nn.Module) -> nn.Linear | None:
        """The linear module surgery inserted after the MLP's norm (`NormThenLinear`), or ``None``."""
        if self.mlp_output_norm_name is None:
            return None
        module = layer.get_submodule(self.mlp_output_norm_name)
        return module.linear if isinstance(module, NormThenLinear) else None

    def attention_output_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm between the attention output projection and the residual add (Gemma-2/3's
        ``post_attention_layernorm``), or ``None``."""
        return None

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """``norm``'s per-dimension gain, float64 (``weight + norm_weight_offset``)."""
        weight = norm.weight.detach().to(torch.float64)
        return self.norm_weight_offset + weight if self.norm_weight_offset else weight

    def output_norm_gain(self, layer_index: int) -> torch.Tensor:
        """The gain of the norm after layer ``layer_index``'s MLP (`mlp_output_norm`), float64."""
        norm = self.mlp_output_norm(self.layer(layer_index))
        if norm is None:
            raise NotImplementedError(f"{self.family}: no norm after the MLP")
        return self.norm_gain(norm)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def layer(self, index: int) -> nn.Module:
        return self.decoder_layers()[index]

    # -- accounting ------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters: in total, without the input embedding and output head, and per layer."""
        total = _unique_total(self.model.parameters())
        embedding_like = _unique_total(list(self.embeddings().parameters()) + list(self.lm_head().parameters()))
        return {
            "total": total,
            "without_embeddings": total - embedding_like,
            "per_layer": _unique_total(self.layer(0).parameters()),
        }

    # -- where the layer list lives, and whether layers may go ---------------------------------
    def set_stored_layers(self, layers: nn.ModuleList) -> None:
        """Put ``layers`` where the model keeps its decoder layers (what `stored_layers` returns)."""
        raise NotImplementedError(f"{self.family}: replacing the decoder layer list is not supported")

    def check_layers_removable(self) -> None:
        """Raise `ConfigError` where removing decoder layers would change what the kept layers compute (GPT-2
        with ``scale_attn_by_inverse_layer_idx``); nothing by default."""

    def head_is_tied(self) -> bool:
        """Whether the LM head's weight is the input embedding's."""
        head = getattr(self.lm_head(), "weight", None)
        return head is not None and head is self.embeddings().weight

    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        """The attention sub-block's output projection (its output is added to the residual stream)."""
        raise NotImplementedError(f"{self.family}: no attention output projection known")

    def attention_block_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """Parameters of the attention sub-block, its pre-norm included."""
        raise NotImplementedError(f"{self.family}: no attention sub-block known")

    # -- observing activations -------------------------------------------------------------
    def observe_residual(self, k: int, fn: Callable[[torch.Tensor], None]):
        """Call ``fn(h_k)`` ([B, T, d]) on every forward: ``h_0`` is the input of layer 0, ``h_k`` the
        output of layer k - 1 (``h_L`` before the final norm). Returns a handle with ``remove()``."""
        layers = self.decoder_layers()
        if not 0 <= k <= len(layers):
            raise ConfigError(f"h_{k}: the model has residual points 0..{len(layers)}")
        if k == 0:
            def before_first(module, args, kwargs):
                fn(args[0] if args else kwargs["hidden_states"])
            return layers[0].register_forward_pre_hook(before_first, with_kwargs=True)
        return layers[k - 1].register_forward_hook(lambda module, args, output: fn(_first(output)))

    def observe_mlp_output(self, k: int, fn: Callable[[torch.Tensor], None]):
        """Call ``fn(M_k)`` ([B, T, d]: what layer k's MLP adds to the residual stream; zeros where that
        MLP is skipped) on every forward."""
        return self.mlp(self.layer(k)).register_forward_hook(lambda module, args, output: fn(_first(output)))

    def after_layer(self, k: int, fn: Callable[[], None]):
        """Call ``fn()`` after layer k's forward (e.g. to raise and end a pass early)."""
        return self.layer(k).register_forward_hook(lambda module, args, output: fn())

    def sequential_sub_blocks(self) -> bool:
        """Whether the MLP sub-block reads ``Y_k`` (attention, then MLP); False where attention and MLP read
        the layer input in parallel (GPT-NeoX ``use_parallel_residual``, Falcon's parallel forms)."""
        return True

    def observe_attention_residual(self, k: int, fn: Callable[[torch.Tensor], None]):
        """Call ``fn(Y_k)`` ([B, T, d]): the residual stream after layer k's attention residual add, i.e. the
        input of its MLP sub-block's own pre-norm. Where attention and MLP run in parallel there is no such
        tensor and ``Y_k = h_{k+1} - M_k`` is taken (float64). A skipped attention gives ``Y_k = h_k``."""
        layer = self.layer(k)
        if not self.sequential_sub_blocks():
            kept: dict[str, torch.Tensor] = {}
            return RemovableHandles(
                self.observe_mlp_output(k, lambda m: kept.__setitem__("m", m.to(torch.float64))),
                self.observe_residual(k + 1, lambda h: fn(h.to(torch.float64) - kept.pop("m"))))
        norm, _ = self.sub_block_norm_and_module(layer, "mlp")
        return self._observe_in_layer_shape(layer, layer.get_submodule(norm), fn, output=False)

    def observe_sub_block(self, k: int, part: str, where: str, fn: Callable[[torch.Tensor], None]):
        """Call ``fn(x)`` ([B, T, d]) with sub-block ``part`` ("attention" / "mlp") of layer k seen from
        inside: ``where="normed_input"`` is the output of its own pre-norm, ``"output"`` the output of its
        module (attention / MLP), before any post-norm and the residual add (a copy: Falcon adds onto it in
        place). `ConfigError` where the sub-block has no own pre-norm or no single module."""
        if where not in ("normed_input", "output"):
            raise ConfigError(f"sub-block point {where!r}; allowed: normed_input, output")
        layer = self.layer(k)
        norm, module = self.sub_block_norm_and_module(layer, part)
        if norm is None or module is None:
            raise ConfigError(f"{self.family}: the {part} sub-block has no own pre-norm and single module to observe")
        target = layer.get_submodule(norm if where == "normed_input" else module)
        return self._observe_in_layer_shape(layer, target, fn, output=True)

    def sub_block_norm_and_module(self, layer: nn.Module, part: str) -> tuple[str | None, str | None]:
        """The sub-block's own pre-norm (the first norm its stand-ins list) and its one module returning
        zeros when skipped (``None`` where there are several, e.g. OPT's fc1 / fc2)."""
        stand_ins = self.sub_block_stand_ins(layer, part)
        norms = [name for name, s in stand_ins.items() if isinstance(s, IdentityStandIn)]
        modules = [name for name, s in stand_ins.items() if isinstance(s, ZeroOutput)]
        return (norms[0] if norms else None), (modules[0] if len(modules) == 1 else None)

    @staticmethod
    def _observe_in_layer_shape(layer: nn.Module, target: nn.Module, fn, output: bool):
        """Hook ``target``'s input (or output) and hand it to ``fn`` as [B, T, d], the layer input's token
        shape (OPT flattens tokens inside its layers)."""
        shape: dict[str, torch.Size] = {}

        def remember(module, args, kwargs):
            shape["tokens"] = (args[0] if args else kwargs["hidden_states"]).shape[:-1]

        def give(x):
            fn(x.reshape(*shape["tokens"], x.shape[-1]))

        if output:
            handle = target.register_forward_hook(lambda module, args, out: give(_first(out).clone()))
        else:
            handle = target.register_forward_pre_hook(
                lambda module, args, kwargs: give(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        return RemovableHandles(layer.register_forward_pre_hook(remember, with_kwargs=True), handle)

    # -- units: the submodules of a sub-block; skipping (a temporary view, not surgery) -----
    #: Whether a decoder layer's forward returns a tuple whose first item is the hidden states (Falcon)
    #: rather than the hidden states alone.
    layer_returns_tuple: bool = False

    def sub_block_stand_ins(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        """The attributes of ``layer`` that make up sub-block ``part`` ("attention" or "mlp"), each with a
        parameter-free module that stands in for it when the sub-block is skipped or removed: the module
        whose output is the sub-block's residual update returns zeros (`ZeroOutput`), the sub-block's
        own norms become the identity; a norm shared with the other sub-block is not listed.
        Raises `ConfigError` where sub-blocks cannot be units."""
        raise ConfigError(f"{self.family}: attention / MLP sub-blocks are not supported as units")

    def check_units(self, units: Iterable[UnitLike]) -> list[Unit]:
        """``units`` normalised (`depthbench.modeling.units.normalize_units`) and validated against the
        model as it is now: indices in range, not every layer, sub-blocks supported by the family."""
        units = normalize_units(units)
        n = self.num_layers
        bad = [str(u) for u in units if u.layer >= n]
        if bad:
            raise ConfigError(f"units {bad}: the model has layers 0..{n - 1}")
        if sum(u.is_layer for u in units) >= n:
            raise ConfigError(f"cannot skip or remove all {n} decoder layers")
        for u in units:
            if not u.is_layer:
                self.sub_block_stand_ins(self.layer(u.layer), u.part)
        return units

    @contextmanager
    def skipping(self, units: Iterable[UnitLike]) -> Iterator[list[Unit]]:
        """Inside the block, a forward pass of the model computes what the model with ``units`` removed
        computes, without changing any weight: a skipped layer passes its input through (it runs
        nothing), a skipped sub-block adds zero to the residual stream (its own norm is not run).

        Only the ``forward`` of the affected modules is replaced, on the instance (hooks registered on
        them still fire); everything is restored on exit, also after an exception. Inside, every
        adapter of this model numbers layers as the model without the skipped layers does
        (`decoder_layers`: ``h_k`` from `observe_residual` is that model's ``h_k``), and surgery is
        refused. Passes run without a KV cache: ``use_cache`` is forced to False, and a pass given a
        cache or ``use_cache=True`` (e.g. ``generate``) is refused, since skipped layers would leave
        gaps in it. ``units`` use the numbering current on entry; yields them normalised."""
        units = self.check_units(units)
        layers = self.decoder_layers()
        skipped = {u.layer for u in units if u.is_layer}
        undo: list = []
        try:
            for u in units:
                if u.is_layer:
                    undo.append(_ForwardPatch(layers[u.layer], PassThrough(self.layer_returns_tuple)))
                    continue
                for name, stand_in in self.sub_block_stand_ins(layers[u.layer], u.part).items():
                    undo.append(_ForwardPatch(layers[u.layer].get_submodule(name), stand_in))
            undo.append(_SkipView(self.model, [layer for k, layer in enumerate(layers) if k not in skipped]))
            undo.append(self.model.register_forward_pre_hook(_without_cache, with_kwargs=True))
            yield units
        finally:
            for item in reversed(undo):
                item.remove()

    #: Whether a removed sub-block may be saved as the full architecture with all its parameters 0
    #: (`depthbench.modeling.saving`): true where such a sub-block adds exactly 0 to the residual stream
    #: (its output projection is 0, and whatever follows it maps 0 to 0, as Gemma's RMSNorm does).
    sub_blocks_save_zeroed: bool = True

    def unit_parameter_count(self, unit: UnitLike) -> int:
        """Parameters a unit holds now (a layer: all of it; a sub-block: its modules, own norms included)."""
        (u,) = normalize_units([unit])
        layer = self.layer(u.layer)
        if u.is_layer:
            return _unique_total(layer.parameters())
        names = self.sub_block_stand_ins(layer, u.part)
        return _unique_total([p for name in names for p in layer.get_submodule(name).parameters()])

    # -- running single layers -------------------------------------------------------------
    def layer_forward(self, layer: nn.Module, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run one decoder layer standalone on ``hidden_states`` [B, T, d], as inside the model.

        Positions are 0..T-1; ``attention_mask`` [B, T] (1 = real token) is combined with the
        causal mask exactly as the model does. No KV cache. Gradients flow (no ``no_grad`` here).
        """
        raise NotImplementedError(f"{self.family}: running a single decoder layer is not supported")

    def linear_parameters(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """Weights and biases of the layer's linear maps (attention and MLP projections, not its norms),
        by name relative to the layer: what LaCo's layer merge adds up."""
        out = {}
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's Conv1D too
                for key, p in module.named_parameters(recurse=False):
                    out[f"{name}.{key}"] = p
        return out

    # -- facts surgery relies on (Prune&Comp's residual scaling) -----------------------------
    #: Whether every sub-block reads the residual stream through a norm that ignores its scale (pre-norm),
    #: so that multiplying the stream by a constant changes nothing downstream but the scale (up to the
    #: norms' epsilon). False for post-norm configs (OPT-350m).
    pre_norm: bool = True
    #: Whether ``h_0`` is the token embedding alone (times a constant), so that scaling the embedding
    #: matrix scales ``h_0``; False where position embeddings are added (GPT-2, OPT).
    embedding_is_residual_input: bool = True


class _ForwardPatch:
    """Replaces ``module.forward`` on the instance by ``stand_in.forward`` until `remove`, which puts
    back exactly what was there (an instance attribute set by someone else, e.g. accelerate, included)."""

    _MISSING = object()

    def __init__(self, module: nn.Module, stand_in: nn.Module):
        self.module = module
        self.previous = module.__dict__.get("forward", self._MISSING)
        module.forward = stand_in.forward

    def remove(self) -> None:
        if self.previous is self._MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous


#: For each model inside `ModelAdapter.skipping`: the stack of layer views (innermost last).
_SKIP_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _SkipView:
    """Pushes the kept layers as the model's current view until `remove`."""

    def __init__(self, model: nn.Module, kept: list[nn.Module]):
        self.model = model
        _SKIP_VIEWS.setdefault(model, []).append(nn.ModuleList(kept))

    def remove(self) -> None:
        views = _SKIP_VIEWS[self.model]
        views.pop()
        if not views:
            del _SKIP_VIEWS[self.model]


_CACHE_KEYS = ("cache", "past_key_values", "layer_past")


def _without_cache(module, args, kwargs):
    """Forward pre-hook of the model while units are skipped: no KV cache in, none built."""
    given = [k for k in _CACHE_KEYS if kwargs.get(k) is not None]
    if given or kwargs.get("use_cache"):
        raise ValueError(f"a forward pass with units skipped runs without a KV cache (skipped layers would leave "
                         f"gaps in it); got {given or 'use_cache=True'}: pass use_cache=False (generate() is not "
                         f"supported inside adapter.skipping)")
    return args, {**kwargs, "use_cache": False}


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class OutputHookPoint:
    """Stands in for a module where ``M_k`` is not simply one module's output tensor.

    `ModelAdapter.mlp` may return one: forward hooks registered on it see ``M_k`` as [B, T, d],
    safe from later in-place changes (``register`` adapts the hook to the family's layout). Only
    observing hooks are supported: a value the hook returns is ignored.
    """

    def __init__(self, register):
        self._register = register

    def register_forward_hook(self, hook, **kwargs):
        if kwargs:
            raise TypeError(f"OutputHookPoint supports plain forward hooks only, not {sorted(kwargs)}")
        return self._register(hook)


class RemovableHandles:
    """Several hook handles removed together."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def standalone_causal_mask(config, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                           position_ids: torch.Tensor, sliding: bool = False, **kwargs):
    """The attention mask a model builds for its layers, for running one layer standalone (no cache).

    ``sliding`` builds the sliding-window mask (layers whose ``layer_types`` entry is
    ``sliding_attention``); ``kwargs`` go to transformers' mask builder.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    build = create_sliding_window_causal_mask if sliding else create_causal_mask
    mask = None if attention_mask is None else attention_mask.to(hidden_states.device)
    return build(config=config, inputs_embeds=hidden_states, attention_mask=mask, cache=None,
                 position_ids=position_ids, **kwargs)


def standalone_position_ids(hidden_states: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 as a [1, T] tensor, as the models use without a cache."""
    return torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)


def _unique_total(params) -> int:
    """Number of elements, counting a shared (tied) tensor once."""
    seen: dict[int, int] = {}
    for p in params:
        seen.setdefault(id(p), p.numel())
    return sum(seen.values())


adapter_registry: Registry[type[ModelAdapter]] = Registry(
    "model family", base=ModelAdapter, entry_point_group="depthbench.adapters"
)


def supported_model_types() -> list[str]:
    return adapter_registry.names()


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family, or one clear error naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or model_type not in adapter_registry:
        raise ConfigError(
            f"unsupported model family {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return adapter_registry.get(model_type)(model)

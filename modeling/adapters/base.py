"""The adapter interface: where a family keeps its decoder layers, MLPs and norms, layer surgery,
and units (whole layers, attention / MLP sub-blocks) skipped without surgery or removed.

Methods (pruners, calibration hooks, folding) talk to a `ModelAdapter`, never to
``model.model.layers`` directly, so supporting a new architecture is one adapter file and a test:
a family implements `stored_layers`, `mlp`, the projections and norms, `sub_block_stand_ins` and
`layer_forward`; skipping, removal and observation are generic.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from depthbench.errors import ConfigError
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

    def _refuse_while_skipping(self, what: str) -> None:
        if _SKIP_VIEWS.get(self.model):
            raise RuntimeError(f"cannot {what} inside adapter.skipping (indices there refer to the model with "
                               f"units skipped); leave the context first")

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

    def mlp_output_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm between the MLP output projection and the residual add (Gemma-2/3's
        ``post_feedforward_layernorm``), or ``None`` where the projection feeds the residual directly."""
        return None

    def insert_mlp_output_linear(self, layer_index: int, transform: torch.Tensor) -> None:
        """Follow layer ``layer_index``'s MLP output (after its norm) by an explicit linear module, so
        it becomes ``M @ transform``; only where `mlp_output_norm` makes the fold inexact (Gemma)."""
        raise NotImplementedError(f"{self.family}: no explicit linear module after the MLP (the fold is exact here)")

    def mlp_output_linear_layers(self) -> list[int]:
        """Layers carrying a linear module inserted by `insert_mlp_output_linear` (current numbering);
        such a model needs `depthbench.modeling.saving.load_pruned` to reload."""
        return []

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

    # -- surgery ---------------------------------------------------------------------------
    def remove_layers(self, indices: Iterable[int]) -> None:
        """Delete decoder layers (0-based, original numbering) and make the model consistent again.

        Updates ``num_hidden_layers`` and every per-layer config list, renumbers ``layer_idx``
        (KV-cache indexing depends on it) and checks that tied embeddings stay tied.
        """
        self._refuse_while_skipping("remove layers")
        remove = sorted({int(i) for i in indices})
        n = self.num_layers
        bad = [i for i in remove if not 0 <= i < n]
        if bad:
            raise ConfigError(f"cannot remove layers {bad}: the model has layers 0..{n - 1}")
        if len(remove) >= n:
            raise ConfigError(f"cannot remove all {n} decoder layers")
        keep = [i for i in range(n) if i not in set(remove)]
        layers = self.decoder_layers()
        kept_modules = [layers[i] for i in keep]
        self._set_decoder_layers(nn.ModuleList(kept_modules))
        self._update_config_after_removal(keep, n)
        for new_idx, layer in enumerate(kept_modules):
            self._renumber(layer, new_idx)
        self._check_tied_weights()

    def _set_decoder_layers(self, layers: nn.ModuleList) -> None:
        raise NotImplementedError

    def _update_config_after_removal(self, keep: Sequence[int], old_num_layers: int) -> None:
        cfg = self.config
        for sub in _configs_with_layers(cfg):
            for key, value in list(vars(sub).items()):
                if isinstance(value, (list, tuple)) and len(value) == old_num_layers and key != "architectures":
                    setattr(sub, key, type(value)(value[i] for i in keep))
            if getattr(sub, "max_window_layers", None) is not None and isinstance(sub.max_window_layers, int):
                sub.max_window_layers = sum(1 for i in keep if i < sub.max_window_layers)
            sub.num_hidden_layers = len(keep)

    @staticmethod
    def _renumber(layer: nn.Module, new_idx: int) -> None:
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx

    def _check_tied_weights(self) -> None:
        if getattr(self.config, "tie_word_embeddings", False):
            head = self.lm_head()
            if getattr(head, "weight", None) is not None and head.weight is not self.embeddings().weight:
                raise RuntimeError("tied input and output embeddings came apart during surgery")

    def head_is_tied(self) -> bool:
        """Whether the LM head's weight is the input embedding's."""
        head = getattr(self.lm_head(), "weight", None)
        return head is not None and head is self.embeddings().weight

    def untie_output_embeddings(self) -> int:
        """Give a head tied to the input embedding its own weight (a copy) and mark the config untied, so that
        training the head leaves the embedding untouched and the model saves and reloads untied; returns the
        parameters added (V x d), 0 where nothing was tied."""
        self._refuse_while_skipping("untie the output embeddings")
        model, added = self.model, 0
        if self.head_is_tied():
            shared = self.embeddings().weight
            self.lm_head().weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            added = shared.numel()
        configs = [model.config]
        if hasattr(model.config, "get_text_config"):
            configs.append(model.config.get_text_config())
        for config in configs:
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5: what save / tie_weights re-tie
            model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
        return added

    def replace_layer(self, index: int, module: nn.Module) -> None:
        """Put ``module`` in place of decoder layer ``index`` (same position; numbering unchanged).

        The module must be a decoder layer of the model's own class so that the saved model still
        loads with plain ``from_pretrained``; its ``layer_idx`` is set to ``index``.
        """
        self._refuse_while_skipping("replace a layer")
        layers = self.decoder_layers()
        if not 0 <= index < len(layers):
            raise ConfigError(f"cannot replace layer {index}: the model has layers 0..{len(layers) - 1}")
        if type(module) is not type(layers[index]):
            raise TypeError(f"replacement {type(module).__name__} is not a {type(layers[index]).__name__}")
        layers[index] = module
        self._renumber(module, index)

    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        """The attention sub-block's output projection (its output is added to the residual stream)."""
        raise NotImplementedError(f"{self.family}: no attention output projection known")

    def attention_block_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """Parameters of the attention sub-block, its pre-norm included."""
        raise NotImplementedError(f"{self.family}: no attention sub-block known")

    @torch.no_grad()
    def zero_attention_output(self, layer: nn.Module) -> None:
        """Make ``layer``'s attention sub-block add zero to the residual stream by zeroing its output
        projection (weight and bias) in place: the layer keeps its class and parameters, so it still
        saves and loads as a plain decoder layer (LLM-Streamline's FFN replacement)."""
        projection = self.attention_output_projection(layer)
        projection.weight.zero_()
        if getattr(projection, "bias", None) is not None:
            projection.bias.zero_()

    def set_attention_trainable(self, layer: nn.Module, trainable: bool) -> None:
        """Switch gradients of ``layer``'s attention sub-block (its own pre-norm included) on or off."""
        for p in self.attention_block_parameters(layer):
            p.requires_grad_(trainable)

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

    # -- units: skipping without surgery, sub-block removal ---------------------------------
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

    def remove_units(self, units: Iterable[UnitLike]) -> list[Unit]:
        """Remove ``units`` (current numbering) for good: whole layers through `remove_layers`, a sub-block
        by putting its parameter-free stand-ins in place (the layer keeps the other sub-block). Returns
        the normalised units. A model with removed sub-blocks saves and reloads through
        `depthbench.modeling.saving` (transformers cannot express a layer without one of its sub-blocks)."""
        self._refuse_while_skipping("remove units")
        units = self.check_units(units)
        layers = [u.layer for u in units if u.is_layer]
        if layers:
            self.remove_layers(layers)
        for u in units:
            if u.is_layer:
                continue
            new_index = u.layer - sum(1 for k in layers if k < u.layer)
            layer = self.layer(new_index)
            for name, stand_in in self.sub_block_stand_ins(layer, u.part).items():
                parent_name, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, stand_in)
        return units

    #: Whether a removed sub-block may be saved as the full architecture with all its parameters 0
    #: (`depthbench.modeling.saving`): true where such a sub-block adds exactly 0 to the residual stream
    #: (its output projection is 0, and whatever follows it maps 0 to 0, as Gemma's RMSNorm does).
    sub_blocks_save_zeroed: bool = True

    def removed_sub_blocks(self) -> list[Unit]:
        """Sub-blocks removed by `remove_units` (current numbering): those whose parts are all stand-ins."""
        out = []
        for k, layer in enumerate(self.decoder_layers()):
            for part in ("attention", "mlp"):
                try:
                    names = self.sub_block_stand_ins(layer, part)
                except ConfigError:
                    return []
                if all(isinstance(layer.get_submodule(name), StandIn) for name in names):
                    out.append(Unit(k, part))
        return out

    def unit_parameter_count(self, unit: UnitLike) -> int:
        """Parameters a unit holds now (a layer: all of it; a sub-block: its modules, own norms included)."""
        (u,) = normalize_units([unit])
        layer = self.layer(u.layer)
        if u.is_layer:
            return _unique_total(layer.parameters())
        names = self.sub_block_stand_ins(layer, u.part)
        return _unique_total([p for name in names for p in layer.get_submodule(name).parameters()])

    def custom_modules(self) -> dict[str, list]:
        """What transformers' ``from_pretrained`` cannot rebuild from ``config.json`` (empty where nothing):
        ``mlp_output_linear_layers`` (Gemma's inserted linear modules), ``removed_sub_blocks`` and
        ``residual_patch_layers`` (LinearPatch's `ResidualPatch` modules)."""
        out: dict[str, list] = {}
        if self.mlp_output_linear_layers():
            out["mlp_output_linear_layers"] = self.mlp_output_linear_layers()
        if self.removed_sub_blocks():
            out["removed_sub_blocks"] = [str(u) for u in self.removed_sub_blocks()]
        if self.residual_patch_layers():
            out["residual_patch_layers"] = self.residual_patch_layers()
        return out

    #: What `insert_mlp_output_linear` adds, in words and state-dict keys (for saved directories).
    mlp_output_linear_description: str = ""

    # -- running single layers -------------------------------------------------------------
    def layer_forward(self, layer: nn.Module, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run one decoder layer standalone on ``hidden_states`` [B, T, d], as inside the model.

        Positions are 0..T-1; ``attention_mask`` [B, T] (1 = real token) is combined with the
        causal mask exactly as the model does. No KV cache. Gradients flow (no ``no_grad`` here).
        """
        raise NotImplementedError(f"{self.family}: running a single decoder layer is not supported")

    # -- folding ---------------------------------------------------------------------------
    def check_exact_fold(self) -> None:
        """Raise `NotImplementedError` (naming the reason) where a linear map on M cannot be folded
        exactly into the MLP output projection; called before any fold, and cheap enough to call
        before calibration."""
        if not self.mlp_output_is_residual_update:
            raise NotImplementedError(
                f"{self.family}: a linear transform of the MLP output cannot be folded exactly into "
                f"the MLP output projection: {self.inexact_fold_reason}")

    @torch.no_grad()
    def fold_into_mlp_output(self, layer_index: int, transform: torch.Tensor) -> None:
        """Make layer ``layer_index``'s MLP output M become ``M @ transform`` (d x d, acting on the right).

        ``y = x W^T + b``, so ``W <- T^T W`` and ``b <- T^T b``; computed in float64 and cast back.
        """
        self.check_exact_fold()
        self.transform_mlp_output_projection(layer_index, transform)

    @torch.no_grad()
    def transform_mlp_output_projection(self, layer_index: int, transform: torch.Tensor) -> None:
        """The projection's output ``y`` becomes ``y @ transform``: ``W <- T^T W``, ``b <- T^T b``
        (an ``nn.Linear``; float64, cast back). Equals the MLP output M only where nothing follows it."""
        proj = self.mlp_output_projection(self.layer(layer_index))
        t = transform.to(torch.float64).to(proj.weight.device)
        w = proj.weight.data
        proj.weight.data = (t.T @ w.to(torch.float64)).to(w.dtype)
        if getattr(proj, "bias", None) is not None:
            b = proj.bias.data
            proj.bias.data = (t.T @ b.to(torch.float64)).to(b.dtype)


    def linear_parameters(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """Weights and biases of the layer's linear maps (attention and MLP projections, not its norms),
        by name relative to the layer: what LaCo's layer merge adds up."""
        out = {}
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's Conv1D too
                for key, p in module.named_parameters(recurse=False):
                    out[f"{name}.{key}"] = p
        return out

    # -- scaling the residual stream (Prune&Comp) and patching it (LinearPatch) --------------
    #: Whether every sub-block reads the residual stream through a norm that ignores its scale (pre-norm),
    #: so that multiplying the stream by a constant changes nothing downstream but the scale (up to the
    #: norms' epsilon). False for post-norm configs (OPT-350m).
    pre_norm: bool = True
    #: Whether ``h_0`` is the token embedding alone (times a constant), so that scaling the embedding
    #: matrix scales ``h_0``; False where position embeddings are added (GPT-2, OPT).
    embedding_is_residual_input: bool = True

    def check_residual_scaling(self, scale_embeddings: bool = False) -> None:
        """Raise `ConfigError` where scaling the residual stream by a constant is not exact here (a
        post-norm model; with ``scale_embeddings``, also tied or position embeddings)."""
        if not self.pre_norm:
            raise ConfigError(f"{self.family}: this config normalises after the residual add (post-norm), so "
                              f"scaling the residual stream changes what later layers compute")
        if scale_embeddings and not self.embedding_is_residual_input:
            raise ConfigError(f"{self.family}: h_0 adds position embeddings to the token embeddings, so scaling the "
                              f"embedding matrix does not scale h_0; use pruner.compensate_fold=after")
        if scale_embeddings and getattr(self.config, "tie_word_embeddings", False):
            raise ConfigError(f"{self.family}: the input and output embeddings are tied, so scaling the embedding "
                              f"matrix would also scale the logits; use pruner.compensate_fold=after")

    @torch.no_grad()
    def scale_residual_updates(self, layer_index: int, factor: float) -> None:
        """Multiply everything layer ``layer_index`` adds to the residual stream by ``factor``: the
        attention and MLP output projections, weights and biases (float64, cast back)."""
        layer = self.layer(layer_index)
        for proj in (self.attention_output_projection(layer), self.mlp_output_projection(layer)):
            _scale_parameters(factor, proj.weight, getattr(proj, "bias", None))

    @torch.no_grad()
    def scale_embedding_output(self, factor: float) -> None:
        """Multiply ``h_0`` by ``factor`` through the embedding matrix (see `check_residual_scaling`)."""
        self.check_residual_scaling(scale_embeddings=True)
        _scale_parameters(factor, self.embeddings().weight)

    def insert_residual_patch(self, layer_index: int, transform: torch.Tensor) -> None:
        """Follow decoder layer ``layer_index`` by an explicit linear map of the residual stream: its output
        ``h`` becomes ``h @ transform`` (d x d; `ResidualPatch`). The map is a submodule
        ``residual_patch`` of the layer applied by a forward hook; config.json cannot express it, so a
        model carrying one saves and loads through `depthbench.modeling.saving`."""
        self._refuse_while_skipping("insert a residual patch")
        layer = self.layer(layer_index)
        d = self.hidden_size
        if tuple(transform.shape) != (d, d):
            raise ValueError(f"transform of shape {tuple(transform.shape)}; expected ({d}, {d})")
        if isinstance(getattr(layer, "residual_patch", None), ResidualPatch):
            raise ValueError(f"decoder layer {layer_index} already carries a residual patch")
        like = next(layer.parameters())
        layer.residual_patch = ResidualPatch(transform.to(like.device), like.dtype)
        layer.register_forward_hook(_apply_residual_patch)

    def residual_patch_layers(self) -> list[int]:
        """Layers carrying a `ResidualPatch` (current numbering)."""
        return [k for k, layer in enumerate(self.decoder_layers())
                if isinstance(getattr(layer, "residual_patch", None), ResidualPatch)]


class ResidualPatch(nn.Module):
    """``h -> h @ T`` on a decoder layer's output, T stored as ``weight = T^T`` (key
    ``...layers.K.residual_patch.weight``) in float32 at least (float64 for a float64 model); the product
    runs in that dtype and is cast back to ``h``'s."""

    def __init__(self, transform: torch.Tensor, model_dtype: torch.dtype = torch.float32):
        super().__init__()
        dtype = torch.promote_types(model_dtype, torch.float32)
        self.weight = nn.Parameter(transform.detach().to(torch.float64).T.to(dtype).contiguous(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return (hidden_states.to(self.weight.dtype) @ self.weight.T).to(hidden_states.dtype)


def _apply_residual_patch(layer: nn.Module, args, output):
    """Forward hook of a patched layer (looks the patch up on the layer, so a deep copy patches itself)."""
    patch = layer.residual_patch
    if isinstance(output, tuple):
        return (patch(output[0]), *output[1:])
    return patch(output)


def _scale_parameters(factor: float, *params) -> None:
    for p in params:
        if p is not None:
            p.data = (p.data.to(torch.float64) * float(factor)).to(p.dtype)


class StandIn(nn.Module):
    """A parameter-free module put in place of part of a removed or skipped sub-block."""


class ZeroOutput(StandIn):
    """Returns zeros shaped like its input, with last dimension ``width`` (default: the input's), as
    ``(zeros, None)`` where the module it stands in for returns a pair (attention modules)."""

    def __init__(self, width: int | None = None, returns_pair: bool = False):
        super().__init__()
        self.width, self.returns_pair = width, returns_pair

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        zeros = x.new_zeros(*x.shape[:-1], x.shape[-1] if self.width is None else self.width)
        return (zeros, None) if self.returns_pair else zeros

    def extra_repr(self) -> str:
        return f"width={self.width}, returns_pair={self.returns_pair}"


class IdentityStandIn(StandIn):
    """Passes its input through (a removed sub-block's own norm)."""

    def forward(self, x, *args, **kwargs):
        return x


class PassThrough(StandIn):
    """A skipped decoder layer: returns its input hidden states, as ``(h, None)`` for families whose
    layers return a tuple."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, None) if self.returns_tuple else h


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


def _configs_with_layers(cfg) -> list:
    """The config and any nested text config that carries ``num_hidden_layers``."""
    out = [cfg] if hasattr(cfg, "num_hidden_layers") else []
    text = getattr(cfg, "text_config", None)
    if text is not None and text is not cfg and hasattr(text, "num_hidden_layers"):
        out.append(text)
    return out


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

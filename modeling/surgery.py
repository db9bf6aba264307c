"""Model surgery: every lasting change depthbench makes to a model's structure or weights, in one place.

A method (a built-in pruner or a plugin) changes a model through `ModelSurgery`, built on the model's
adapter::

    from depthbench.modeling.surgery import ModelSurgery

    surgery = ModelSurgery(adapter)
    surgery.remove_layers([5, 6])                        # delete decoder layers, config made consistent
    surgery.fold_into_mlp_output(4, T)                   # layer 4's MLP output M becomes M @ T (exact or refused)
    surgery.insert_residual_patch(4, P)                  # layer 4's output h becomes h @ P (an explicit module)

Why a class beside the adapter rather than methods on it: the adapter (`depthbench.modeling.adapters`) answers
"where is it" for one architecture (decoder layers, norms, projections, hook points, which submodules make a
sub-block, whether a norm follows the MLP, how a norm stores its gain); surgery answers "change it" and is the
same for every architecture. Surgery asks the adapter where things are and never subclasses per family, so a
new family is one adapter file (no surgery code), and a new kind of change is one method here (no adapter
code). The per-family facts surgery relies on are adapter attributes and methods: `ModelAdapter.set_stored_layers`,
`check_layers_removable` (GPT-2 with ``scale_attn_by_inverse_layer_idx``), `mlp_output_projection` (an
``nn.Linear`` or GPT-2's transposed ``Conv1D``, told apart by module type), `mlp_output_norm_name` /
`mlp_output_norm` / `attention_output_norm` and `norm_gain` (Gemma's norms after each sub-block, gain
``1 + weight``), `sub_block_stand_ins`, `pre_norm` and `embedding_is_residual_input`.

`ModelAdapter.skipping` is NOT surgery and stays on the adapter: it is a temporary view for scoring candidates
(a forward pass as if units were removed, no weight touched, everything restored on exit), and the adapter's
own numbering (`decoder_layers`, the observers) follows that view. Surgery is refused inside it, since
indices there refer to the model with units skipped.

All arithmetic on weights runs in float64 and is cast back to the weight's dtype. Inserted modules
(`depthbench.modeling.modules`) are not known to transformers: `custom_modules` lists them, and
`depthbench.modeling.saving` saves and reloads such a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from depthbench.errors import ConfigError
from depthbench.modeling.adapters.base import ModelAdapter
from depthbench.modeling.modules import NormThenLinear, ResidualPatch, StandIn, apply_residual_patch
from depthbench.modeling.units import Unit, UnitLike

__all__ = ["ModelSurgery"]


class ModelSurgery:
    """Lasting changes to the model behind ``adapter`` (see the module docstring). Indices are the model's
    current 0-based layer numbering unless a method says otherwise."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def _refuse_while_skipping(self, what: str) -> None:
        if self.adapter.skipping_active():
            raise RuntimeError(f"cannot {what} inside adapter.skipping (indices there refer to the model with "
                               f"units skipped); leave the context first")

    # -- removing ------------------------------------------------------------------------------
    def remove_layers(self, indices: Iterable[int]) -> None:
        """Delete decoder layers and make the model consistent again: ``num_hidden_layers`` and every
        per-layer config list follow the kept layers, ``layer_idx`` is renumbered (KV-cache indexing depends
        on it), and tied embeddings are checked to stay tied."""
        self.adapter.check_layers_removable()
        self._refuse_while_skipping("remove layers")
        remove = sorted({int(i) for i in indices})
        n = self.adapter.num_layers
        bad = [i for i in remove if not 0 <= i < n]
        if bad:
            raise ConfigError(f"cannot remove layers {bad}: the model has layers 0..{n - 1}")
        if len(remove) >= n:
            raise ConfigError(f"cannot remove all {n} decoder layers")
        keep = [i for i in range(n) if i not in set(remove)]
        layers = self.adapter.decoder_layers()
        kept_modules = [layers[i] for i in keep]
        self.adapter.set_stored_layers(nn.ModuleList(kept_modules))
        self._update_config_after_removal(keep, n)
        for new_idx, layer in enumerate(kept_modules):
            _renumber(layer, new_idx)
        self._check_tied_weights()

    def remove_units(self, units: Iterable[UnitLike]) -> list[Unit]:
        """Remove ``units`` (`depthbench.modeling.units`) for good: whole layers through `remove_layers`, a
        sub-block by putting its parameter-free stand-ins in place (the layer keeps the other sub-block).
        Returns the normalised units. A model with removed sub-blocks saves and reloads through
        `depthbench.modeling.saving` (transformers cannot express a layer without one of its sub-blocks)."""
        self._refuse_while_skipping("remove units")
        units = self.adapter.check_units(units)
        layers = [u.layer for u in units if u.is_layer]
        if layers:
            self.remove_layers(layers)
        for u in units:
            if u.is_layer:
                continue
            new_index = u.layer - sum(1 for k in layers if k < u.layer)
            layer = self.adapter.layer(new_index)
            for name, stand_in in self.adapter.sub_block_stand_ins(layer, u.part).items():
                _set_submodule(layer, name, stand_in)
        return units

    def _update_config_after_removal(self, keep: Sequence[int], old_num_layers: int) -> None:
        for sub in _configs_with_layers(self.adapter.config):
            for key, value in list(vars(sub).items()):
                if isinstance(value, (list, tuple)) and len(value) == old_num_layers and key != "architectures":
                    setattr(sub, key, type(value)(value[i] for i in keep))
            if getattr(sub, "max_window_layers", None) is not None and isinstance(sub.max_window_layers, int):
                sub.max_window_layers = sum(1 for i in keep if i < sub.max_window_layers)
            sub.num_hidden_layers = len(keep)

    def _check_tied_weights(self) -> None:
        if getattr(self.adapter.config, "tie_word_embeddings", False):
            head = self.adapter.lm_head()
            if getattr(head, "weight", None) is not None and head.weight is not self.adapter.embeddings().weight:
                raise RuntimeError("tied input and output embeddings came apart during surgery")

    # -- replacing -----------------------------------------------------------------------------
    def replace_layer(self, index: int, module: nn.Module) -> None:
        """Put ``module`` in place of decoder layer ``index`` (same position; numbering unchanged). The module
        must be a decoder layer of the model's own class, so that the saved model still loads with plain
        ``from_pretrained``; its ``layer_idx`` is set to ``index``."""
        self._refuse_while_skipping("replace a layer")
        layers = self.adapter.decoder_layers()
        if not 0 <= index < len(layers):
            raise ConfigError(f"cannot replace layer {index}: the model has layers 0..{len(layers) - 1}")
        if type(module) is not type(layers[index]):
            raise TypeError(f"replacement {type(module).__name__} is not a {type(layers[index]).__name__}")
        layers[index] = module
        _renumber(module, index)

    @torch.no_grad()
    def zero_attention_output(self, layer: nn.Module) -> None:
        """Make ``layer``'s attention sub-block add zero to the residual stream by zeroing its output
        projection (weight and bias) in place: the layer keeps its class and parameters, so it still saves and
        loads as a plain decoder layer (LLM-Streamline's FFN replacement). ``layer`` is a module, so this also
        works on a copy outside the model."""
        projection = self.adapter.attention_output_projection(layer)
        projection.weight.zero_()
        if getattr(projection, "bias", None) is not None:
            projection.bias.zero_()

    def set_attention_trainable(self, layer: nn.Module, trainable: bool) -> None:
        """Switch gradients of ``layer``'s attention sub-block (its own pre-norm included) on or off."""
        for p in self.adapter.attention_block_parameters(layer):
            p.requires_grad_(trainable)

    def untie_output_embeddings(self) -> int:
        """Give a head tied to the input embedding its own weight (a copy) and mark the config untied, so that
        training the head leaves the embedding untouched and the model saves and reloads untied; returns the
        parameters added (V x d), 0 where nothing was tied."""
        self._refuse_while_skipping("untie the output embeddings")
        model, added = self.model, 0
        if self.adapter.head_is_tied():
            shared = self.adapter.embeddings().weight
            self.adapter.lm_head().weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
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

    # -- linear maps on the MLP output -----------------------------------------------------------
    def check_exact_fold(self) -> None:
        """Raise `NotImplementedError` (naming the reason) where a linear map on the MLP output cannot be
        folded exactly into the MLP output projection (`ModelAdapter.mlp_output_is_residual_update`); cheap
        enough to call before calibration."""
        if not self.adapter.mlp_output_is_residual_update:
            raise NotImplementedError(
                f"{self.adapter.family}: a linear transform of the MLP output cannot be folded exactly into "
                f"the MLP output projection: {self.adapter.inexact_fold_reason}")

    @torch.no_grad()
    def fold_into_mlp_output(self, layer_index: int, transform: torch.Tensor) -> None:
        """Make layer ``layer_index``'s MLP output M become ``M @ transform`` (d x d, on the right), where that
        is exact with zero new parameters: into the MLP output projection where nothing follows it; where a
        norm follows the MLP (Gemma), into a linear module the layer already carries, or a diagonal transform
        into the norm's gain. Otherwise `NotImplementedError` naming the reason, the model untouched; the
        caller then chooses `insert_mlp_output_linear` (exact, d x d parameters) or `fold_through_output_norm`
        (a fitted approximation)."""
        adapter = self.adapter
        layer = adapter.layer(layer_index)
        if adapter.mlp_output_norm(layer) is None:
            self.check_exact_fold()
            self.transform_mlp_output_projection(layer_index, transform)
            return
        t = transform.to(torch.float64)
        if adapter.mlp_output_linear(layer) is not None:  # compose into it: exact for any T
            self.insert_mlp_output_linear(layer_index, t)
            return
        if torch.count_nonzero(t - torch.diag(t.diagonal())) == 0:
            norm = adapter.mlp_output_norm(layer)
            gain = adapter.norm_gain(norm)
            self.set_norm_gain(norm, gain * t.diagonal().to(gain.device))
            return
        raise NotImplementedError(
            f"{adapter.family}: a full linear transform of the MLP output cannot be folded exactly into "
            f"the MLP output projection: {adapter.inexact_fold_reason}; apply it with insert_mlp_output_linear "
            f"(explicit module) or fold_through_output_norm (with a fitted projection and gain)")

    @torch.no_grad()
    def transform_mlp_output_projection(self, layer_index: int, transform: torch.Tensor) -> None:
        """The MLP output projection's output ``y`` becomes ``y @ transform``: ``W <- T^T W``, ``b <- T^T b``
        for an ``nn.Linear`` (``y = x W^T + b``), ``W <- W T``, ``b <- b T`` for GPT-2's ``Conv1D``
        (``y = x W + b``). Equals ``M @ transform`` only where nothing follows the projection."""
        proj = self.adapter.mlp_output_projection(self.adapter.layer(layer_index))
        t = transform.to(torch.float64).to(proj.weight.device)
        conv1d = _is_conv1d(proj)
        w = proj.weight.data
        proj.weight.data = ((w.to(torch.float64) @ t) if conv1d else (t.T @ w.to(torch.float64))).to(w.dtype)
        if getattr(proj, "bias", None) is not None:
            b = proj.bias.data
            proj.bias.data = ((b.to(torch.float64) @ t) if conv1d else (t.T @ b.to(torch.float64))).to(b.dtype)

    @torch.no_grad()
    def insert_mlp_output_linear(self, layer_index: int, transform: torch.Tensor) -> None:
        """Follow the norm after layer ``layer_index``'s MLP (`ModelAdapter.mlp_output_norm_name`, Gemma's
        ``post_feedforward_layernorm``) by ``Linear(d, d, bias=False)`` with weight ``transform^T``
        (`NormThenLinear`), so the residual stream receives ``M @ transform`` exactly (up to the model dtype).
        Where the layer already has one, the transform is composed into it (``W <- T^T W``, float64).
        `NotImplementedError` where no norm follows the MLP (fold into the projection instead)."""
        adapter = self.adapter
        name = adapter.mlp_output_norm_name
        if name is None:
            raise NotImplementedError(f"{adapter.family}: no explicit linear module after the MLP (the fold is "
                                      f"exact here)")
        self._refuse_while_skipping("insert a linear module after the MLP")
        layer = adapter.layer(layer_index)
        t = transform.to(torch.float64)
        linear = adapter.mlp_output_linear(layer)
        if linear is not None:
            w = linear.weight.data
            linear.weight.data = (t.T.to(w.device) @ w.to(torch.float64)).to(w.dtype)
            return
        norm = layer.get_submodule(name)
        like = norm.weight
        d = adapter.hidden_size
        if t.shape != (d, d):
            raise ValueError(f"transform of shape {tuple(t.shape)}; expected ({d}, {d})")
        linear = nn.Linear(d, d, bias=False, device=like.device, dtype=like.dtype)
        linear.weight.data = t.T.to(device=like.device).to(like.dtype).contiguous()
        _set_submodule(layer, name, NormThenLinear(norm, linear))

    @torch.no_grad()
    def fold_through_output_norm(self, layer_index: int, down: torch.Tensor, gain: torch.Tensor) -> None:
        """Where a norm follows the MLP: make the MLP output ``Norm(u @ down) * gain`` (``u`` the projection's
        output): the projection transformed by ``down`` (`transform_mlp_output_projection`) and the norm's
        gain set to ``gain``; what a method fitted to approximate ``M @ T`` with zero new parameters."""
        norm = self.adapter.mlp_output_norm(self.adapter.layer(layer_index))
        if norm is None:
            raise NotImplementedError(f"{self.adapter.family}: no norm after the MLP to fold through")
        self.transform_mlp_output_projection(layer_index, down)
        self.set_norm_gain(norm, gain)

    @torch.no_grad()
    def set_norm_gain(self, norm: nn.Module, gain: torch.Tensor) -> None:
        """Make ``norm`` scale by ``gain`` (per dimension): its weight becomes what the family stores for that
        gain (`ModelAdapter.norm_weight_offset`: Gemma stores ``gain - 1``); float64, cast back."""
        weight = norm.weight
        offset = self.adapter.norm_weight_offset
        weight.data = (gain.to(device=weight.device, dtype=torch.float64) - offset).to(weight.dtype)

    # -- the residual stream (Prune&Comp, LinearPatch) -----------------------------------------------
    def check_residual_scaling(self, scale_embeddings: bool = False) -> None:
        """Raise `ConfigError` where scaling the residual stream by a constant is not exact here (a post-norm
        model; with ``scale_embeddings``, also tied or position embeddings)."""
        adapter = self.adapter
        if not adapter.pre_norm:
            raise ConfigError(f"{adapter.family}: this config normalises after the residual add (post-norm), so "
                              f"scaling the residual stream changes what later layers compute")
        if scale_embeddings and not adapter.embedding_is_residual_input:
            raise ConfigError(f"{adapter.family}: h_0 adds position embeddings to the token embeddings, so scaling "
                              f"the embedding matrix does not scale h_0; use pruner.compensate_fold=after")
        if scale_embeddings and getattr(adapter.config, "tie_word_embeddings", False):
            raise ConfigError(f"{adapter.family}: the input and output embeddings are tied, so scaling the "
                              f"embedding matrix would also scale the logits; use pruner.compensate_fold=after")

    @torch.no_grad()
    def scale_residual_updates(self, layer_index: int, factor: float) -> None:
        """Multiply everything layer ``layer_index`` adds to the residual stream by ``factor``: per sub-block,
        the gain of the norm its output passes last (`attention_output_norm` / `mlp_output_norm`, Gemma's)
        or else its output projection, weight and bias (float64, cast back). An inserted linear module after
        a norm is linear, so scaling the norm scales it too."""
        adapter = self.adapter
        layer = adapter.layer(layer_index)
        norms = (adapter.attention_output_norm(layer), adapter.mlp_output_norm(layer))
        projections = (adapter.attention_output_projection, adapter.mlp_output_projection)
        for norm, projection in zip(norms, projections):
            if norm is not None:
                self.set_norm_gain(norm, adapter.norm_gain(norm) * float(factor))
            else:
                proj = projection(layer)
                _scale_parameters(factor, proj.weight, getattr(proj, "bias", None))

    @torch.no_grad()
    def scale_embedding_output(self, factor: float) -> None:
        """Multiply ``h_0`` by ``factor`` through the embedding matrix (see `check_residual_scaling`)."""
        self.check_residual_scaling(scale_embeddings=True)
        _scale_parameters(factor, self.adapter.embeddings().weight)

    def insert_residual_patch(self, layer_index: int, transform: torch.Tensor) -> None:
        """Follow decoder layer ``layer_index`` by an explicit linear map of the residual stream: its output
        ``h`` becomes ``h @ transform`` (d x d; `ResidualPatch`, a submodule ``residual_patch`` of the layer
        applied by a forward hook). config.json cannot express it, so a model carrying one saves and loads
        through `depthbench.modeling.saving`."""
        self._refuse_while_skipping("insert a residual patch")
        layer = self.adapter.layer(layer_index)
        d = self.adapter.hidden_size
        if tuple(transform.shape) != (d, d):
            raise ValueError(f"transform of shape {tuple(transform.shape)}; expected ({d}, {d})")
        if isinstance(getattr(layer, "residual_patch", None), ResidualPatch):
            raise ValueError(f"decoder layer {layer_index} already carries a residual patch")
        like = next(layer.parameters())
        layer.residual_patch = ResidualPatch(transform.to(like.device), like.dtype)
        layer.register_forward_hook(apply_residual_patch)

    # -- what surgery left in the model ---------------------------------------------------------------
    def removed_sub_blocks(self) -> list[Unit]:
        """Sub-blocks removed by `remove_units` (current numbering): those whose parts are all stand-ins."""
        out = []
        for k, layer in enumerate(self.adapter.decoder_layers()):
            for part in ("attention", "mlp"):
                try:
                    names = self.adapter.sub_block_stand_ins(layer, part)
                except ConfigError:
                    return []
                if all(isinstance(layer.get_submodule(name), StandIn) for name in names):
                    out.append(Unit(k, part))
        return out

    def mlp_output_linear_layers(self) -> list[int]:
        """Layers carrying a linear module inserted by `insert_mlp_output_linear` (current numbering)."""
        adapter = self.adapter
        return [k for k, layer in enumerate(adapter.decoder_layers()) if adapter.mlp_output_linear(layer) is not None]

    def residual_patch_layers(self) -> list[int]:
        """Layers carrying a `ResidualPatch` (current numbering)."""
        return [k for k, layer in enumerate(self.adapter.decoder_layers())
                if isinstance(getattr(layer, "residual_patch", None), ResidualPatch)]

    def custom_modules(self) -> dict[str, list]:
        """What transformers' ``from_pretrained`` cannot rebuild from ``config.json`` (empty where nothing):
        ``mlp_output_linear_layers``, ``removed_sub_blocks`` and ``residual_patch_layers``."""
        out: dict[str, list] = {}
        if self.mlp_output_linear_layers():
            out["mlp_output_linear_layers"] = self.mlp_output_linear_layers()
        if self.removed_sub_blocks():
            out["removed_sub_blocks"] = [str(u) for u in self.removed_sub_blocks()]
        if self.residual_patch_layers():
            out["residual_patch_layers"] = self.residual_patch_layers()
        return out

    @property
    def mlp_output_linear_description(self) -> str:
        """What `insert_mlp_output_linear` adds, in words and state-dict keys (for saved directories)."""
        name = self.adapter.mlp_output_norm_name
        if name is None:
            return ""
        return f"Linear(hidden, hidden, bias=False) after {name} (keys ...{name}.norm.weight / .linear.weight)"


def _renumber(layer: nn.Module, new_idx: int) -> None:
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = new_idx


def _set_submodule(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, module)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with W stored [in, out], the transpose of ``nn.Linear``."""
    return type(module).__name__ == "Conv1D"


def _scale_parameters(factor: float, *params) -> None:
    for p in params:
        if p is not None:
            p.data = (p.data.to(torch.float64) * float(factor)).to(p.dtype)


def _configs_with_layers(cfg) -> list:
    """The config and any nested text config that carries ``num_hidden_layers``."""
    out = [cfg] if hasattr(cfg, "num_hidden_layers") else []
    text = getattr(cfg, "text_config", None)
    if text is not None and text is not cfg and hasattr(text, "num_hidden_layers"):
        out.append(text)
    return out

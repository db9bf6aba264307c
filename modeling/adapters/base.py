"""The adapter interface: where a family keeps its decoder layers, MLPs and norms, and layer surgery.

Methods (pruners, calibration hooks, folding) talk to a `ModelAdapter`, never to
``model.model.layers`` directly, so supporting a new architecture is one adapter file and a test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Sequence

import torch
from torch import nn

from depthbench.errors import ConfigError
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
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers in order; layer k maps h_k to h_{k+1}."""

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
        remove = sorted(set(int(i) for i in indices))
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

    def replace_layer(self, index: int, module: nn.Module) -> None:
        """Put ``module`` in place of decoder layer ``index`` (same position; numbering unchanged).

        The module must be a decoder layer of the model's own class so that the saved model still
        loads with plain ``from_pretrained``; its ``layer_idx`` is set to ``index``.
        """
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

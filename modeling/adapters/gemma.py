"""Gemma-2 and Gemma-3 (text): the Llama layout plus a norm after the attention and after the MLP.

A layer computes ``h + post_attention_norm(attention(...))`` and then
``Y + post_feedforward_norm(mlp(pre_feedforward_norm(Y)))``. What is added to the residual stream
is the output of ``post_feedforward_layernorm``, so that is what this adapter calls ``M_k`` (the hook
point of `mlp`): ``h_{k+1} = Y_k + M_k`` holds exactly, as the statistics assume.

Folding a ReplaceMe transform T of ``M_k``: with ``u`` the down projection's output and
``g = 1 + weight`` the norm's gain (Gemma's RMSNorm scales by ``1 + weight``),
``M = u / rms(u) * g``.

- Diagonal T (``t`` on the diagonal): ``M T = u / rms(u) * (g t)``, so the fold is exact and goes
  into the norm: ``weight <- (1 + weight) t - 1``.
- Full T: the norm rescales every token by its own length, so no change of ``mlp.down_proj`` turns
  ``M`` into ``M T`` for all tokens: `fold_into_mlp_output` refuses it, never approximates silently.
  The method chooses one of two ways and calls it: an explicit ``Linear(d, d, bias=False)`` holding
  ``T^T`` after the norm (`insert_mlp_output_linear`: exact, d x d new parameters, and the saved model
  needs `depthbench.modeling.saving.load_pruned`), or ``down_proj`` and the gain refitted on calibration data
  (`fold_through_output_norm` with what the method fitted: zero new parameters, approximate).
- A layer that already carries such a linear takes any further transform into it (exact).

Sliding-window and global layers alternate (``config.layer_types``); the generic surgery keeps that
list in step with the kept layers, and every attention module keeps the window it was built with.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from depthbench.modeling.adapters.base import (IdentityStandIn, ZeroOutput, adapter_registry, standalone_causal_mask,
                                               standalone_position_ids)
from depthbench.modeling.adapters.llama import LlamaFamilyAdapter


@adapter_registry.register("gemma2", "gemma3_text")
class GemmaAdapter(LlamaFamilyAdapter):
    """Where the layers, norms, embeddings and head live is Llama's; what differs is below."""

    family = "gemma"
    model_types = ("gemma2", "gemma3_text")

    mlp_output_is_residual_update = False
    inexact_fold_reason = ("Gemma-2/3 apply an RMSNorm (post_feedforward_layernorm) between mlp.down_proj and the "
                           "residual add, which rescales each token by its own norm; a diagonal transform folds "
                           "exactly into that norm's weight, a full one only through a fit on calibration data")

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.post_feedforward_layernorm  # its output is what the residual stream receives

    def mlp_output_norm(self, layer: nn.Module) -> nn.Module:
        module = layer.post_feedforward_layernorm
        return module.norm if isinstance(module, NormThenLinear) else module

    def mlp_output_linear(self, layer: nn.Module) -> nn.Linear | None:
        """The linear module inserted after the post-FFN norm, or ``None``."""
        module = layer.post_feedforward_layernorm
        return module.linear if isinstance(module, NormThenLinear) else None

    def mlp_output_linear_layers(self) -> list[int]:
        return [k for k, layer in enumerate(self.decoder_layers()) if self.mlp_output_linear(layer) is not None]

    @torch.no_grad()
    def insert_mlp_output_linear(self, layer_index: int, transform: torch.Tensor) -> None:
        """Follow layer ``layer_index``'s post-FFN norm by ``Linear(d, d, bias=False)`` with weight
        ``transform^T``, so the residual stream receives ``M @ transform`` exactly (up to the model dtype).
        Where the layer already has one, the transform is composed into it (``W <- T^T W``, float64)."""
        layer = self.layer(layer_index)
        t = transform.to(torch.float64)
        linear = self.mlp_output_linear(layer)
        if linear is not None:
            w = linear.weight.data
            linear.weight.data = (t.T.to(w.device) @ w.to(torch.float64)).to(w.dtype)
            return
        norm = layer.post_feedforward_layernorm
        like = norm.weight
        d = self.hidden_size
        if t.shape != (d, d):
            raise ValueError(f"transform of shape {tuple(t.shape)}; expected ({d}, {d})")
        linear = nn.Linear(d, d, bias=False, device=like.device, dtype=like.dtype)
        linear.weight.data = t.T.to(device=like.device).to(like.dtype).contiguous()
        layer.post_feedforward_layernorm = NormThenLinear(norm, linear)

    def output_norm_gain(self, layer_index: int) -> torch.Tensor:
        """The post-FFN norm's per-dimension gain ``1 + weight``, float64."""
        return 1.0 + self.mlp_output_norm(self.layer(layer_index)).weight.detach().to(torch.float64)

    @torch.no_grad()
    def _set_output_norm_gain(self, layer_index: int, gain: torch.Tensor) -> None:
        weight = self.mlp_output_norm(self.layer(layer_index)).weight
        weight.data = (gain.to(device=weight.device, dtype=torch.float64) - 1.0).to(weight.dtype)

    @torch.no_grad()
    def fold_into_mlp_output(self, layer_index: int, transform: torch.Tensor) -> None:
        """Make layer ``layer_index``'s MLP output M become ``M @ transform`` where that is exact: into a
        linear module the layer already carries, or a diagonal transform into the norm's gain. A full
        transform raises `NotImplementedError` (see the module docstring for the two ways to apply it)."""
        t = transform.to(torch.float64)
        if self.mlp_output_linear(self.layer(layer_index)) is not None:  # compose into it: exact for any T
            self.insert_mlp_output_linear(layer_index, t)
            return
        if torch.count_nonzero(t - torch.diag(t.diagonal())) == 0:
            gain = self.output_norm_gain(layer_index)
            self._set_output_norm_gain(layer_index, gain * t.diagonal().to(gain.device))
            return
        raise NotImplementedError(
            f"{self.family}: a full linear transform of the MLP output cannot be folded exactly into "
            f"mlp.down_proj: {self.inexact_fold_reason}; apply it with insert_mlp_output_linear (explicit module) "
            f"or fold_through_output_norm (with a fitted projection and gain)")

    @torch.no_grad()
    def fold_through_output_norm(self, layer_index: int, down: torch.Tensor, gain: torch.Tensor) -> None:
        """Make the MLP output ``RMSNorm(u @ down) * gain``: ``W_down <- down^T W_down`` (and the bias),
        norm weight ``<- gain - 1``; computed in float64, cast back."""
        self.transform_mlp_output_projection(layer_index, down)
        self._set_output_norm_gain(layer_index, gain)

    @torch.no_grad()
    def scale_residual_updates(self, layer_index: int, factor: float) -> None:
        """What a Gemma layer adds to the stream leaves a norm (post-attention, post-FFN), so the norms'
        gains ``1 + weight`` are scaled (an inserted linear after the post-FFN norm is linear: unaffected)."""
        layer = self.layer(layer_index)
        for norm in (layer.post_attention_layernorm, self.mlp_output_norm(layer)):
            gain = 1.0 + norm.weight.data.to(torch.float64)
            norm.weight.data = (gain * float(factor) - 1.0).to(norm.weight.dtype)

    mlp_output_linear_description = ("Linear(hidden, hidden, bias=False) after post_feedforward_layernorm "
                                     "(keys ...post_feedforward_layernorm.norm.weight / .linear.weight)")

    def sub_block_stand_ins(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        """Gemma's sub-blocks carry a norm before and after (the one after may hold ReplaceMe's linear)."""
        if part == "attention":
            return {"input_layernorm": IdentityStandIn(), "self_attn": ZeroOutput(returns_pair=True),
                    "post_attention_layernorm": IdentityStandIn()}
        return {"pre_feedforward_layernorm": IdentityStandIn(), "mlp": ZeroOutput(),
                "post_feedforward_layernorm": IdentityStandIn()}

    def attention_block_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return (list(layer.self_attn.parameters()) + list(layer.input_layernorm.parameters())
                + list(layer.post_attention_layernorm.parameters()))

    def layer_forward(self, layer: nn.Module, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        layer_type = getattr(layer.self_attn, "layer_type", None) or "full_attention"
        position_ids = standalone_position_ids(hidden_states)
        rotary = self.model.model.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma-3: RoPE per layer type
            position_embeddings = rotary(hidden_states, position_ids, layer_type)
        else:
            position_embeddings = rotary(hidden_states, position_ids)
        mask = standalone_causal_mask(self.config, hidden_states, attention_mask, position_ids,
                                      sliding=layer_type == "sliding_attention")
        out = layer(hidden_states, position_embeddings=position_embeddings, attention_mask=mask,
                    position_ids=position_ids, use_cache=False)
        return out[0] if isinstance(out, tuple) else out


class NormThenLinear(nn.Module):
    """The post-FFN norm followed by an explicit ``Linear(d, d, bias=False)`` (weight ``T^T``): outputs
    ``M T``. Keys ``post_feedforward_layernorm.norm.weight`` and ``post_feedforward_layernorm.linear.weight``;
    plain ``from_pretrained`` does not know them, so such a model is saved and loaded by
    `depthbench.modeling.saving`."""

    def __init__(self, norm: nn.Module, linear: nn.Linear):
        super().__init__()
        self.norm = norm
        self.linear = linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(hidden_states))

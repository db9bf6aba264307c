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
  ``M`` into ``M T`` for all tokens: `ModelSurgery.fold_into_mlp_output` refuses it, never approximates
  silently. The method chooses one of two ways and calls it: an explicit ``Linear(d, d, bias=False)``
  holding ``T^T`` after the norm (`ModelSurgery.insert_mlp_output_linear`: exact, d x d new parameters, and
  the saved model needs `depthbench.modeling.saving.load_pruned`), or ``down_proj`` and the gain refitted on
  calibration data (`ModelSurgery.fold_through_output_norm` with what the method fitted: zero new
  parameters, approximate).
- A layer that already carries such a linear takes any further transform into it (exact).

This adapter only says where those norms are (`mlp_output_norm_name`, `attention_output_norm`) and how they
store their gain (`norm_weight_offset`); the surgery itself (`depthbench.modeling.surgery`) is generic.

Sliding-window and global layers alternate (``config.layer_types``); the generic surgery keeps that
list in step with the kept layers, and every attention module keeps the window it was built with.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from depthbench.modeling.adapters.base import adapter_registry, standalone_causal_mask, standalone_position_ids
from depthbench.modeling.adapters.llama import LlamaFamilyAdapter
from depthbench.modeling.modules import IdentityStandIn, ZeroOutput


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

    mlp_output_norm_name = "post_feedforward_layernorm"
    norm_weight_offset = 1.0  # Gemma's RMSNorm scales by 1 + weight

    def attention_output_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

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


"""Gemma-2 and Gemma-3 (text): the Llama layout plus a norm after the attention and after the MLP.

A layer computes ``h + post_attention_norm(attention(...))`` and then
``Y + post_feedforward_norm(mlp(pre_feedforward_norm(Y)))``. What is added to the residual stream
is the output of ``post_feedforward_layernorm``, so that is what this adapter calls ``M_k`` (the hook
point of `mlp`): ``h_{k+1} = Y_k + M_k`` holds exactly, as the statistics assume.

A ReplaceMe transform T of ``M_k`` cannot be folded into ``mlp.down_proj``: the RMSNorm between the
projection and the residual add rescales every token by its own norm, so no change of the
projection's weights turns ``M`` into ``M T`` for all tokens. The adapter therefore refuses the fold
(``mlp_output_is_residual_update = False``) with that reason instead of folding approximately.

Sliding-window and global layers alternate (``config.layer_types``); the generic surgery keeps that
list in step with the kept layers, and every attention module keeps the window it was built with.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from modeling.adapters.base import adapter_registry, standalone_causal_mask, standalone_position_ids
from modeling.adapters.llama import LlamaFamilyAdapter


@adapter_registry.register("gemma2", "gemma3_text")
class GemmaAdapter(LlamaFamilyAdapter):
    """Where the layers, norms, embeddings and head live is Llama's; what differs is below."""

    family = "gemma"
    model_types = ("gemma2", "gemma3_text")

    mlp_output_is_residual_update = False
    inexact_fold_reason = ("Gemma-2/3 apply an RMSNorm (post_feedforward_layernorm) between mlp.down_proj and the "
                           "residual add, which rescales each token by its own norm; a fold would be only "
                           "approximate (ReplaceMe on Gemma would need an explicit linear module, i.e. custom "
                           "code, which is not implemented)")

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.post_feedforward_layernorm  # its output is what the residual stream receives

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

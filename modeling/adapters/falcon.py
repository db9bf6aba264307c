"""Falcon: ``model.transformer.h``, rotary positions or ALiBi, usually attention and MLP in parallel.

A layer adds ``attention + mlp`` to the residual stream (``parallel_attn`` / the new decoder
architecture) or adds them one after the other; either way the MLP's output
(``mlp.dense_4h_to_h``) enters the residual add unchanged, so ReplaceMe folds are exact.

One trap: in the parallel forms Falcon adds the attention output IN PLACE onto the MLP's output
tensor (``mlp_output += attention_output``), which would also change an activation a hook kept by
reference. `mlp` therefore returns a hook point whose hooks see a copy of the MLP's output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from depthbench.modeling.adapters.base import (ModelAdapter, OutputHookPoint, adapter_registry, standalone_causal_mask,
                                               standalone_position_ids)
from depthbench.modeling.modules import IdentityStandIn, ZeroOutput


@adapter_registry.register("falcon")
class FalconAdapter(ModelAdapter):
    family = "falcon"
    model_types = ("falcon",)
    layer_returns_tuple = True  # (hidden states, attention weights)

    def stored_layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def set_stored_layers(self, layers: nn.ModuleList) -> None:
        self.model.transformer.h = layers

    def sequential_sub_blocks(self) -> bool:
        return not (self.config.parallel_attn or self.config.new_decoder_architecture)

    def mlp(self, layer: nn.Module) -> OutputHookPoint:
        """M_k: the MLP's output, copied before Falcon adds the attention output onto it in place."""
        def register(hook):
            return layer.mlp.register_forward_hook(lambda module, args, output: hook(module, args, output.clone()))
        return OutputHookPoint(register)

    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.dense_4h_to_h

    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attention.dense

    def sub_block_stand_ins(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        """A skipped branch adds zero: in the parallel forms the layer becomes ``h + mlp(ln(h))`` or
        ``h + attention(ln(h))``. Own norms go with their branch (``ln_attn`` / ``ln_mlp``; sequential:
        ``input_layernorm`` / ``post_attention_layernorm``); one input norm shared by both branches stays.
        The MLP stand-in returns a fresh tensor, which Falcon's in-place ``mlp_output += attention``
        may change freely."""
        attention = part == "attention"
        out = {"self_attention": ZeroOutput(returns_pair=True)} if attention else {"mlp": ZeroOutput()}
        if hasattr(layer, "ln_attn"):
            out["ln_attn" if attention else "ln_mlp"] = IdentityStandIn()
        elif not self.config.parallel_attn:
            out["input_layernorm" if attention else "post_attention_layernorm"] = IdentityStandIn()
        return out

    def attention_block_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """The attention and its own pre-norm; a norm shared with the MLP (parallel attention with
        one input norm) belongs to the MLP as well and is left out."""
        params = list(layer.self_attention.parameters())
        if hasattr(layer, "ln_attn"):
            params += list(layer.ln_attn.parameters())
        elif not self.config.parallel_attn and not self.config.new_decoder_architecture:
            params += list(layer.input_layernorm.parameters())
        return params

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def embeddings(self) -> nn.Embedding:
        return self.model.transformer.word_embeddings

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def layer_forward(self, layer: nn.Module, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        batch, length = hidden_states.shape[:2]
        position_ids = standalone_position_ids(hidden_states)
        mask = standalone_causal_mask(cfg, hidden_states, attention_mask, position_ids, allow_is_causal_skip=False)
        alibi = None
        if cfg.alibi:
            from transformers.models.falcon.modeling_falcon import build_alibi_tensor

            real = (torch.ones(batch, length, dtype=torch.long, device=hidden_states.device)
                    if attention_mask is None else attention_mask.to(hidden_states.device))
            alibi = build_alibi_tensor(real, cfg.num_attention_heads, dtype=hidden_states.dtype)
            if mask is not None and mask.ndim == 4:  # the model folds ALiBi into the additive mask
                dtype_min = torch.finfo(hidden_states.dtype).min
                if mask.dtype == torch.bool:
                    mask = torch.where(mask, torch.zeros((), dtype=hidden_states.dtype, device=mask.device), dtype_min)
                alibi = alibi.reshape(batch, -1, *alibi.shape[1:])
                mask = torch.masked_fill(alibi / math.sqrt(cfg.hidden_size // cfg.num_attention_heads),
                                         mask < -1, dtype_min)
        position_embeddings = self.model.transformer.rotary_emb(hidden_states, position_ids=position_ids)
        out = layer(hidden_states, alibi=alibi, attention_mask=mask, position_ids=position_ids,
                    position_embeddings=position_embeddings, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

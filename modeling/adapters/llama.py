"""Llama-family layout: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM.

``model.model.layers[k]`` with ``.mlp.down_proj``, ``model.model.norm``, ``model.model.embed_tokens``,
``model.lm_head``; the MLP output is added straight to the residual stream, so folds are exact.
"""

from __future__ import annotations

import torch
from torch import nn

from depthbench.modeling.adapters.base import (ModelAdapter, adapter_registry, standalone_causal_mask,
                                               standalone_position_ids)
from depthbench.modeling.modules import IdentityStandIn, ZeroOutput


@adapter_registry.register("llama", "mistral", "qwen2", "qwen3", "smollm3")
class LlamaFamilyAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")

    def stored_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def set_stored_layers(self, layers: nn.ModuleList) -> None:
        self.model.model.layers = layers

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.o_proj

    def attention_block_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return list(layer.self_attn.parameters()) + list(layer.input_layernorm.parameters())

    def sub_block_stand_ins(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        if part == "attention":
            return {"input_layernorm": IdentityStandIn(), "self_attn": ZeroOutput(returns_pair=True)}
        return {"post_attention_layernorm": IdentityStandIn(), "mlp": ZeroOutput()}

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def embeddings(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def uses_sliding_window(self, layer: nn.Module) -> bool:
        """Qwen2/3 mark sliding layers in ``layer_types``; Mistral slides everywhere when
        ``sliding_window`` is set (its config has no ``layer_types``)."""
        types = getattr(self.config, "layer_types", None)
        if types is not None:
            return types[layer.self_attn.layer_idx] == "sliding_attention"
        return getattr(self.config, "sliding_window", None) is not None and self.config.model_type == "mistral"

    def layer_forward(self, layer: nn.Module, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        position_ids = standalone_position_ids(hidden_states)
        position_embeddings = self.model.model.rotary_emb(hidden_states, position_ids=position_ids)
        causal_mask = standalone_causal_mask(self.config, hidden_states, attention_mask, position_ids,
                                             sliding=self.uses_sliding_window(layer))
        out = layer(hidden_states, attention_mask=causal_mask, position_embeddings=position_embeddings,
                    position_ids=position_ids, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

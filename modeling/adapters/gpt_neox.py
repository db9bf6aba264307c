"""GPT-NeoX / Pythia: ``model.gpt_neox.layers``, rotary positions, attention and MLP in parallel.

With ``use_parallel_residual`` (Pythia's default) a layer computes
``h + attention(ln1(h)) + mlp(ln2(h))``: the MLP reads the layer input, not ``Y_k``, but its output
(``mlp.dense_4h_to_h``, then a dropout) is still added straight to the residual stream, so
``h_{k+1} = Y_k + M_k`` with ``Y_k = h_k + attention`` and a ReplaceMe fold is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from depthbench.modeling.adapters.base import (ModelAdapter, adapter_registry, standalone_causal_mask,
                                               standalone_position_ids)
from depthbench.modeling.modules import IdentityStandIn, ZeroOutput


@adapter_registry.register("gpt_neox")
class GPTNeoXAdapter(ModelAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)

    def stored_layers(self) -> nn.ModuleList:
        return self.model.gpt_neox.layers

    def set_stored_layers(self, layers: nn.ModuleList) -> None:
        self.model.gpt_neox.layers = layers

    def sequential_sub_blocks(self) -> bool:
        return not getattr(self.config, "use_parallel_residual", True)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.dense_4h_to_h

    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.attention.dense

    def sub_block_stand_ins(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        """Each branch has its own norm, parallel or not; a skipped branch adds zero (with
        ``use_parallel_residual`` the layer becomes ``h + mlp(ln2(h))`` or ``h + attention(ln1(h))``)."""
        if part == "attention":
            return {"input_layernorm": IdentityStandIn(), "attention": ZeroOutput(returns_pair=True)}
        return {"post_attention_layernorm": IdentityStandIn(), "mlp": ZeroOutput()}

    def attention_block_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return list(layer.attention.parameters()) + list(layer.input_layernorm.parameters())

    def final_norm(self) -> nn.Module:
        return self.model.gpt_neox.final_layer_norm

    def embeddings(self) -> nn.Embedding:
        return self.model.gpt_neox.embed_in

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def layer_forward(self, layer: nn.Module, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        position_ids = standalone_position_ids(hidden_states)
        position_embeddings = self.model.gpt_neox.rotary_emb(hidden_states, position_ids=position_ids)
        mask = standalone_causal_mask(self.config, hidden_states, attention_mask, position_ids)
        out = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                    position_embeddings=position_embeddings, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

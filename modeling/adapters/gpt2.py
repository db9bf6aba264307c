"""GPT-2: ``model.transformer.h``, learned absolute positions, ``Conv1D`` projections.

``Conv1D`` stores its weight transposed with respect to ``nn.Linear``: ``y = x W + b`` with W of
shape [in, out]. A map T on the MLP output therefore folds as ``W <- W T``, ``b <- b T``
(`depthbench.modeling.surgery` tells the two apart by module type).
Positions are added to the embeddings before layer 0, so a layer run standalone needs only the
causal mask.

Configs with ``scale_attn_by_inverse_layer_idx: true`` scale each layer's attention by
``1 / (layer_idx + 1)``: renumbering the kept layers would change what they compute, so such models
are refused for layer removal.
"""

from __future__ import annotations

import torch
from torch import nn

from depthbench.errors import ConfigError
from depthbench.modeling.adapters.base import (ModelAdapter, adapter_registry, standalone_causal_mask,
                                               standalone_position_ids)
from depthbench.modeling.modules import IdentityStandIn, ZeroOutput


@adapter_registry.register("gpt2")
class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    embedding_is_residual_input = False  # h_0 = wte + wpe

    def stored_layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def set_stored_layers(self, layers: nn.ModuleList) -> None:
        self.model.transformer.h = layers

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def mlp_output_projection(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj  # a Conv1D: weight [in, out]

    def attention_output_projection(self, layer: nn.Module) -> nn.Module:
        return layer.attn.c_proj

    def sub_block_stand_ins(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        if part == "attention":
            return {"ln_1": IdentityStandIn(), "attn": ZeroOutput(returns_pair=True)}
        return {"ln_2": IdentityStandIn(), "mlp": ZeroOutput()}

    def attention_block_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return list(layer.attn.parameters()) + list(layer.ln_1.parameters())

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def check_layers_removable(self) -> None:
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            raise ConfigError("gpt2: scale_attn_by_inverse_layer_idx=true scales attention by the layer's index, "
                              "so removing layers would change what the kept layers compute")

    def layer_forward(self, layer: nn.Module, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        position_ids = standalone_position_ids(hidden_states)
        mask = standalone_causal_mask(self.config, hidden_states, attention_mask, position_ids)
        out = layer(hidden_states, attention_mask=mask, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

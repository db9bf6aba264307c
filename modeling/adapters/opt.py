"""OPT: ``model.model.decoder.layers``, learned absolute positions, biases, MLP as ``fc1``/``fc2``.

OPT has no MLP module: ``fc1 -> activation -> fc2`` live on the decoder layer, on tokens flattened
to [B*T, d]. ``M_k`` is the output of ``fc2`` (then a dropout, the identity in eval mode), given
back to hooks as [B, T, d], and ReplaceMe folds into ``fc2`` (weight and bias). Positions are added
to the embeddings before layer 0, so a layer run standalone needs only the causal mask.

OPT-350m style configs (``do_layer_norm_before: false``) normalise AFTER each residual add
(``h_{k+1} = LN(Y_k + M_k)``): the layers can still be removed, but a fold into ``fc2`` is not
exact there, and attention / MLP sub-blocks cannot be units there; the adapter says so.
"""

from __future__ import annotations

import torch
from torch import nn

from depthbench.errors import ConfigError
from depthbench.modeling.adapters.base import (ModelAdapter, OutputHookPoint, RemovableHandles, adapter_registry,
                                               standalone_causal_mask, standalone_position_ids)
from depthbench.modeling.modules import IdentityStandIn, ZeroOutput


@adapter_registry.register("opt")
class OPTAdapter(ModelAdapter):
    family = "opt"
    model_types = ("opt",)
    embedding_is_residual_input = False  # h_0 = embed_tokens (projected) + embed_positions

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not getattr(self.config, "do_layer_norm_before", True):
            self.mlp_output_is_residual_update = False
            self.pre_norm = False
            self.inexact_fold_reason = ("this OPT config (do_layer_norm_before: false, post-norm like OPT-350m) "
                                        "normalises after the residual add")

    def _decoder(self) -> nn.Module:
        return self.model.model.decoder

    def stored_layers(self) -> nn.ModuleList:
        return self._decoder().layers

    def set_stored_layers(self, layers: nn.ModuleList) -> None:
        self._decoder().layers = layers

    def mlp(self, layer: nn.Module) -> OutputHookPoint:
        """M_k: the output of ``fc2``, reshaped from [B*T, d] to the layer input's [B, T, d]."""
        def register(hook):
            shape = {}

            def remember(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                shape["tokens"] = x.shape[:-1]

            def observe(module, args, output):
                hook(module, args, output.view(*shape["tokens"], output.shape[-1]))

            return RemovableHandles(layer.register_forward_pre_hook(remember, with_kwargs=True),
                                    layer.fc2.register_forward_hook(observe))
        return OutputHookPoint(register)

    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.fc2

    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.out_proj

    def sub_block_stand_ins(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        """The MLP is ``final_layer_norm -> fc1 -> activation -> fc2`` on the layer itself: ``fc1`` stands
        in as a zero-width output (nothing computed), ``fc2`` as zeros of the hidden size."""
        if not getattr(self.config, "do_layer_norm_before", True):
            raise ConfigError("opt: this config (do_layer_norm_before: false, post-norm like OPT-350m) normalises "
                              "after each residual add, so an attention or MLP sub-block cannot be removed alone "
                              "(its norm also normalises the other sub-block's stream); remove whole layers")
        if part == "attention":
            return {"self_attn_layer_norm": IdentityStandIn(), "self_attn": ZeroOutput(returns_pair=True)}
        return {"final_layer_norm": IdentityStandIn(), "fc1": ZeroOutput(width=0),
                "fc2": ZeroOutput(width=self.hidden_size)}

    def attention_block_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return list(layer.self_attn.parameters()) + list(layer.self_attn_layer_norm.parameters())

    def final_norm(self) -> nn.Module:
        """What maps h_L to the head's input: the final norm (absent in post-norm configs) and, where
        the embedding width differs from the hidden size, ``project_out``."""
        decoder = self._decoder()
        parts = [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None]
        if not parts:
            return nn.Identity()
        return parts[0] if len(parts) == 1 else nn.Sequential(*parts)

    def embeddings(self) -> nn.Embedding:
        return self._decoder().embed_tokens

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def layer_forward(self, layer: nn.Module, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        position_ids = standalone_position_ids(hidden_states)
        mask = standalone_causal_mask(self.config, hidden_states, attention_mask, position_ids)
        out = layer(hidden_states, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

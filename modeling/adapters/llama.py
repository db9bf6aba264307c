"""Llama-family layout: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM.

``model.model.layers[k]`` with ``.mlp.down_proj``, ``model.model.norm``, ``model.model.embed_tokens``,
``model.lm_head``; the MLP output is added straight to the residual stream, so folds are exact.
"""

from __future__ import annotations

from torch import nn

from modeling.adapters.base import ModelAdapter, adapter_registry


@adapter_registry.register("llama", "mistral", "qwen2", "qwen3", "smollm3")
class LlamaFamilyAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def _set_decoder_layers(self, layers: nn.ModuleList) -> None:
        self.model.model.layers = layers

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def embeddings(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

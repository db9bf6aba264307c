"""Phi-3: the Llama layout (``model.model.layers``, rotary positions) with a fused gate/up projection.

The fused ``mlp.gate_up_proj`` sits before the activation, so it does not matter to depth pruning:
the MLP still ends in ``mlp.down_proj``, whose output (after a dropout, the identity in eval mode)
is added straight to the residual stream, so folds are exact.
"""

from __future__ import annotations

from depthbench.modeling.adapters.base import adapter_registry
from depthbench.modeling.adapters.llama import LlamaFamilyAdapter


@adapter_registry.register("phi3")
class Phi3Adapter(LlamaFamilyAdapter):
    family = "phi3"
    model_types = ("phi3",)

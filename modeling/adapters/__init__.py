"""Architecture adapters. `adapter_for(model)` picks the adapter registered for the model's family."""

from depthbench.modeling.adapters.base import ModelAdapter, adapter_for, adapter_registry, supported_model_types

# Importing a family's module registers its adapter.
from depthbench.modeling.adapters import llama  # noqa: E402,F401
from depthbench.modeling.adapters import falcon, gemma, gpt2, gpt_neox, opt, phi3  # noqa: E402,F401

__all__ = ["ModelAdapter", "adapter_for", "adapter_registry", "supported_model_types"]

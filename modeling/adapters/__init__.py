"""Architecture adapters. `adapter_for(model)` picks the adapter registered for the model's family."""

from modeling.adapters.base import ModelAdapter, adapter_for, adapter_registry, supported_model_types

# Importing a family's module registers its adapter.
from modeling.adapters import llama  # noqa: E402,F401
from modeling.adapters import falcon, gemma, gpt2, gpt_neox, opt, phi3  # noqa: E402,F401

__all__ = ["ModelAdapter", "adapter_for", "adapter_registry", "supported_model_types"]

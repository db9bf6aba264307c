"""Healing after pruning: a short LoRA fine-tune of the kept layers, merged back into the weights, or a
full fine-tune of the pruned model's last layers, final norm and head (``partial_layers``).

The ``healing`` config group (``none`` default, ``lora``, ``partial_layers``) is applied after pruning and
before the pruned model is evaluated as the run's result; the pruned-only numbers stay in the record beside the healed
ones and are computed once per pruned model (`depthbench.healing.pruned_cache`), so a sweep over
healing budgets does not repeat them.
"""

from depthbench.healing.settings import LoraSettings, PartialLayerSettings, check_healing, healing_settings

__all__ = ["LoraSettings", "PartialLayerSettings", "check_healing", "healing_settings"]

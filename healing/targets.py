"""Which modules LoRA adapts: the attention and MLP projections of the kept decoder layers, named per
model family.

The names are keyed by the adapter's ``family`` (`depthbench.modeling.adapters`), so the family is
resolved the same way as for pruning; an adapter class (e.g. a plugin's) may declare its own
``lora_projections = {"attention": (...), "mlp": (...)}``. Names are paths inside one decoder layer.
LoRA is given the full module names of the layers the model has now (the kept ones), so embeddings,
the LM head and modules added by a pruner (ReplaceMe's explicit linear after Gemma's norm) are never
adapted, and a sub-block that pruning removed (its stand-in has no projections) is skipped.
"""

from __future__ import annotations

from depthbench.errors import ConfigError

PARTS = ("attention", "mlp")

_LLAMA = {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
          "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
PROJECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA,
    "gemma": _LLAMA,
    "phi3": {"attention": ("self_attn.qkv_proj", "self_attn.o_proj"), "mlp": ("mlp.gate_up_proj", "mlp.down_proj")},
    "opt": {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
            "mlp": ("fc1", "fc2")},
    # Conv1D modules (weight stored [in, out]): LoRA needs fan_in_fan_out (set by `uses_conv1d`)
    "gpt2": {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    "gpt_neox": {"attention": ("attention.query_key_value", "attention.dense"),
                 "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")},
    "falcon": {"attention": ("self_attention.query_key_value", "self_attention.dense"),
               "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")},
}


def projections_of(adapter_cls) -> dict[str, tuple[str, ...]]:
    """``{part: layer-relative module paths}`` for an adapter class (or instance)."""
    own = getattr(adapter_cls, "lora_projections", None)
    if own is not None:
        return {part: tuple(own.get(part, ())) for part in PARTS}
    family = getattr(adapter_cls, "family", "")
    if family not in PROJECTIONS:
        raise ConfigError(f"healing=lora: no LoRA target modules are known for the model family {family!r} "
                          f"(known: {', '.join(sorted(PROJECTIONS))}); declare lora_projections on its adapter")
    return PROJECTIONS[family]


def selected_paths(projections: dict[str, tuple[str, ...]], settings) -> list[str]:
    """The layer-relative paths ``settings`` selects: every projection of ``settings.targets``, narrowed
    to ``settings.target_modules`` (a path such as ``self_attn.q_proj`` or its last name ``q_proj``)."""
    candidates = [p for part in settings.targets for p in projections[part]]
    if settings.target_modules is None:
        return candidates
    unknown = [n for n in settings.target_modules
               if not any(n == p or n == p.rsplit(".", 1)[-1] for p in candidates)]
    if unknown:
        raise ConfigError(f"healing.target_modules: unknown {', '.join(map(repr, unknown))} for this model family "
                          f"with healing.targets={list(settings.targets)}; allowed: "
                          f"{', '.join(p.rsplit('.', 1)[-1] for p in candidates)}")
    return [p for p in candidates if any(n == p or n == p.rsplit(".", 1)[-1] for n in settings.target_modules)]


def target_module_names(adapter, settings) -> list[str]:
    """Full module names (as in ``model.named_modules()``) of the selected projections in every decoder
    layer the model has now."""
    import torch
    from transformers.pytorch_utils import Conv1D

    paths = selected_paths(projections_of(type(adapter)), settings)
    index = {id(module): name for name, module in adapter.model.named_modules()}
    names = []
    for layer in adapter.decoder_layers():
        prefix = index[id(layer)]
        for path in paths:
            try:
                module = layer.get_submodule(path)
            except AttributeError:  # a sub-block removed by pruning: its stand-in has no projections
                continue
            if isinstance(module, (torch.nn.Linear, Conv1D)):
                names.append(f"{prefix}.{path}")
    if not names:
        raise ConfigError(f"healing=lora: none of {', '.join(paths)} is a linear module in the pruned model's layers")
    return names


def uses_conv1d(model, names: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(model.get_submodule(n), Conv1D) for n in names)


def model_type_without_weights(model_cfg) -> str | None:
    """The ``model_type`` from config.json (a local directory or the Hub's small file) or the packaged
    GGUF's header; None when it cannot be read cheaply (targets are then checked after loading)."""
    from depthbench.modeling.loading import gguf_path, gguf_metadata

    if model_cfg.get("name_or_path"):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(model_cfg.name_or_path),
                                              revision=model_cfg.get("revision") or None).model_type
        except Exception:  # noqa: BLE001 - unreachable Hub, odd config: checked again after loading
            return None
    gguf = model_cfg.get("gguf")
    if not gguf:
        return None
    return gguf_metadata(gguf_path(gguf.package, gguf.file), "general.architecture")


def check_targets_for_model(settings, model_cfg) -> None:
    """Unknown target modules for the model's family: one ConfigError before any weights are read."""
    from depthbench.modeling.adapters import adapter_registry

    model_type = model_type_without_weights(model_cfg)
    if model_type is None or model_type not in adapter_registry:
        return  # the load reports an unsupported family; targets are checked on the loaded model
    selected_paths(projections_of(adapter_registry.get(model_type)), settings)

"""The steps of a run with ``model.layerwise=true`` that differ from the in-memory pipeline: the checks before any
weights, the skeleton instead of the loaded model, the layer-wise calibration service, the shard-by-shard save
(`depthbench.modeling.layerwise`, `depthbench.calibration.layerwise`).

What a layer-wise run does not do, and why (docs/USAGE.md, "Models larger than memory"): it evaluates nothing
(the base model would have to be loaded whole, and the pruned one is usually still larger than memory: the saved
``pruned_model/`` is a plain transformers directory, evaluated with lm-eval or any tool that loads it whole); it
heals nothing (training needs the model); it caches no statistics and stores no activations (each pass is read
from the checkpoint again).
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from depthbench.errors import ConfigError
from depthbench.settings import ModelSettings

#: Config keys of the layer-wise mode (``model.*``; declared with their defaults and help by
#: `depthbench.settings.ModelSettings`, whose defaults stand in for a node that lacks them).
LAYERWISE, BUFFER_GB = "layerwise", "layerwise_buffer_gb"


def enabled(cfg: DictConfig) -> bool:
    return bool(cfg.model.get(LAYERWISE, ModelSettings.layerwise))


def check(cfg: DictConfig, pruner) -> None:
    """Every refusal of a layer-wise run, before any weights (config.json and the shards' index are read)."""
    from depthbench.modeling.layerwise import check_layerwise_source
    from depthbench.pruners import pruner_registry
    from depthbench.pruners.methods.compensation import CompensatedPruner

    supported = ", ".join(n for n in pruner_registry.names() if pruner_registry.get(n).supports_layerwise)
    compensated = isinstance(pruner, CompensatedPruner)
    if compensated or not pruner.supports_layerwise:
        what = f"pruner.compensate={cfg.pruner.get('compensate')}" if compensated else f"pruner={pruner.name}"
        raise ConfigError(f"{what} is not supported with model.layerwise=true (it re-scores, trains on or changes the "
                          f"model beyond one layer at a time, so it needs the whole model in memory); layer-wise "
                          f"methods: {supported}")
    pruner.check_layerwise_options()
    for key, allowed, why in (("evaluate", False, "evaluation needs the whole model in memory: the saved "
                                                  "pruned_model/ loads with from_pretrained for lm-eval"),
                              ("save_model", True, "the saved model is what a layer-wise run produces")):
        if bool(cfg.get(key)) != allowed:
            raise ConfigError(f"model.layerwise=true needs {key}={str(allowed).lower()} ({why})")
    if (cfg.get("healing") or {}).get("name", "none") != "none":
        raise ConfigError(f"model.layerwise=true needs healing=none (healing={cfg.healing.name} trains the whole "
                          "model)")
    if cfg.model.get("device_map"):
        raise ConfigError(f"model.layerwise=true places one layer at a time on `device`; set model.device_map=null "
                          f"(got {cfg.model.device_map!r})")
    buffer_gb = cfg.model.get(BUFFER_GB, ModelSettings.layerwise_buffer_gb)
    if isinstance(buffer_gb, bool) or not isinstance(buffer_gb, (int, float)) or not buffer_gb >= 0 \
            or not math.isfinite(buffer_gb):
        raise ConfigError(f"model.{BUFFER_GB}={buffer_gb!r}; allowed: a number of GiB >= 0")
    source = cfg.model.get("name_or_path")
    if not source or not Path(str(source)).expanduser().is_dir():
        raise ConfigError(f"model.layerwise=true reads a local safetensors directory: set model=hf "
                          f"model.name_or_path=DIR (got {'the packaged GGUF' if not source else repr(str(source))}; "
                          "download a Hub model first, e.g. huggingface-cli download ID --local-dir DIR)")
    check_layerwise_source(Path(str(source)).expanduser())


def buffer_bytes(cfg: DictConfig) -> int:
    return int(float(cfg.model.get(BUFFER_GB, ModelSettings.layerwise_buffer_gb)) * 1024**3)


def load(cfg: DictConfig, tokenizer, device: str):
    """The skeleton with its resident part read (`LayerwiseModel`) and a `LoadedModel` around it."""
    from depthbench.modeling.layerwise import LayerwiseModel
    from depthbench.modeling.loading import LoadedModel, model_name, parse_dtype

    source = Path(str(cfg.model.name_or_path)).expanduser()
    weights = LayerwiseModel(source, parse_dtype(cfg.model.dtype, device), device)
    return weights, LoadedModel(model=weights.model, tokenizer=tokenizer, name=model_name(cfg.model),
                                source=str(source))

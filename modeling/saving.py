"""Save a pruned model as a ``save_pretrained`` directory plus its ``pruning.json``, and load it back.

Normally the directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and no custom code.
The exception is a model carrying explicit linear modules after a norm (ReplaceMe on Gemma-2/3 with
``norm_fold: linear``): transformers would load it with those weights dropped and only a warning, so
such a directory is laid out so that plain ``from_pretrained`` fails loudly (no weights at the top
level: ``OSError ... no file named model.safetensors``), with the weights in ``depthbench_weights/``,
the inserted layers listed in ``depthbench_modules.json`` and a ``README.md`` saying how to load it:
`load_pruned` (base architecture from ``config.json``, linear modules re-inserted, weights loaded
strictly). Written to a temporary sibling and renamed into place, so a crash leaves nothing
half-written.
"""

from __future__ import annotations

import json
from pathlib import Path

from depthbench import atomic

METADATA_FILE = "pruning.json"
#: Lists the layers that carry an inserted linear module; its presence means "load with `load_pruned`".
CUSTOM_MODULES_FILE = "depthbench_modules.json"
#: Where the weights of such a model go (never at the top level, so plain ``from_pretrained`` fails).
WEIGHTS_DIR = "depthbench_weights"
CUSTOM_FORMAT_VERSION = 1
LOAD_INSTRUCTIONS = ("needs depthbench to load: depthbench.modeling.saving.load_pruned(directory) (plain from_pretrained "
                     "fails: the weights are in depthbench_weights/ and include modules transformers does not know)")


def _mlp_output_linear_layers(model) -> list[int]:
    from depthbench.errors import ConfigError
    from depthbench.modeling.adapters import adapter_for

    try:
        return adapter_for(model).mlp_output_linear_layers()
    except ConfigError:  # a family without an adapter cannot carry depthbench's modules
        return []


def save_pruned(model, tokenizer, directory: str | Path, metadata: dict) -> Path:
    directory = Path(directory)
    linear_layers = _mlp_output_linear_layers(model)
    with atomic.directory(directory) as tmp:
        if not linear_layers:
            model.save_pretrained(tmp)
        else:
            weights = tmp / WEIGHTS_DIR
            model.save_pretrained(weights)
            for name in ("config.json", "generation_config.json"):  # no config beside the weights either
                if (weights / name).is_file():
                    (weights / name).replace(tmp / name)
            custom = {"format_version": CUSTOM_FORMAT_VERSION, "mlp_output_linear_layers": linear_layers,
                      "module": "Linear(hidden, hidden, bias=False) after post_feedforward_layernorm "
                                "(keys ...post_feedforward_layernorm.norm.weight / .linear.weight)",
                      "weights": WEIGHTS_DIR, "load_with": "depthbench.modeling.saving.load_pruned(directory)"}
            atomic.write_json(tmp / CUSTOM_MODULES_FILE, custom)
            atomic.write_text(tmp / "README.md", _readme(linear_layers))
            metadata = {**metadata, "custom_modules": {**custom, "note": LOAD_INSTRUCTIONS}}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / METADATA_FILE, metadata)
    return directory


def _readme(layers: list[int]) -> str:
    return ("# Pruned by depthbench: needs depthbench to load\n\n"
            f"Decoder layers {layers} carry an explicit `Linear(hidden, hidden, bias=False)` after their "
            "post-FFN norm (ReplaceMe's transform T, `norm_fold: linear`). Plain "
            "`AutoModelForCausalLM.from_pretrained` cannot load this directory (it would drop those weights, so "
            "they are kept in `depthbench_weights/` where it does not look). Load it with:\n\n"
            "```python\nfrom depthbench.modeling.saving import load_pruned\nmodel = load_pruned(\"THIS_DIRECTORY\")\n```\n\n"
            "`pruning.json` describes the pruning; `depthbench_modules.json` lists the layers.\n")


def load_pruned(directory: str | Path, dtype=None, device: str | None = None, device_map=None):
    """Load a directory written by `save_pruned`, in eval mode, with identical logits.

    Plain directories go to ``AutoModelForCausalLM.from_pretrained``. Where ``depthbench_modules.json``
    exists: the base architecture is built from ``config.json`` (in its saved dtype unless ``dtype`` is
    given) without random initialisation, directly on ``device``; the listed linear modules are
    re-inserted through the adapter; every tensor is streamed from the safetensors files into its
    parameter (peak memory: the model plus one tensor), strictly (a missing, unknown or misshapen key
    raises; only tied copies of loaded weights may be absent). ``device_map`` (``"auto"``, one
    device, or a module -> device dict) spreads the loaded model with accelerate, as
    ``from_pretrained(device_map=...)`` does.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    sidecar = directory / CUSTOM_MODULES_FILE
    if not sidecar.is_file():
        kwargs = {} if dtype is None else {"dtype": dtype}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        return (model.to(device) if device and device_map is None else model).eval()
    custom = json.loads(sidecar.read_text(encoding="utf-8"))
    if custom.get("format_version") != CUSTOM_FORMAT_VERSION:
        raise ValueError(f"{sidecar}: format_version {custom.get('format_version')!r}; this depthbench reads "
                         f"{CUSTOM_FORMAT_VERSION}")
    if device_map is not None and not isinstance(device_map, (str, dict)):  # before any weight is read
        raise ValueError(f"device_map={device_map!r}; allowed: 'auto', a device name, or a module -> device dict")
    files = sorted((directory / custom.get("weights", WEIGHTS_DIR)).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors in {custom.get('weights', WEIGHTS_DIR)}/")
    from depthbench.modeling.adapters import adapter_for

    config = AutoConfig.from_pretrained(directory)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with _without_random_initialisation(), torch.device(device if device and device_map is None else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    for k in custom["mlp_output_linear_layers"]:
        adapter.insert_mlp_output_linear(int(k), torch.zeros(adapter.hidden_size, adapter.hidden_size))
    loaded, unexpected = _stream_weights(model, files)
    model.tie_weights()
    # a key may be absent only where its parameter is shared with (tied to) a loaded one
    names_of: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), set()).add(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in model.state_dict() if k not in loaded]
    untied_missing = [k for k in missing if k not in params or not (names_of[id(params[k])] & loaded)]
    if unexpected or untied_missing:
        raise RuntimeError(f"{directory}: weights do not match the architecture: missing {untied_missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if device_map is not None:
        model = _dispatch(model, device_map, dtype)
    return model.eval()


def _without_random_initialisation():
    """transformers' own switch that skips the random initialisation every weight is about to be
    overwritten by (minutes for an 8B model); a plain context where a release lacks it."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def _stream_weights(model, files: list[Path]) -> tuple[set[str], list[str]]:
    """Copy every tensor of ``files`` into the model's parameter or buffer of the same name, one
    tensor at a time. Returns the names loaded and the file keys the model has no slot for."""
    import torch
    from safetensors import safe_open

    slots = model.state_dict(keep_vars=True)
    loaded, unexpected = set(), []
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key not in slots:
                        unexpected.append(key)
                        continue
                    tensor = handle.get_tensor(key)
                    if tensor.shape != slots[key].shape:
                        raise RuntimeError(f"{f}: {key} has shape {tuple(tensor.shape)}; the architecture "
                                           f"expects {tuple(slots[key].shape)}")
                    slots[key].copy_(tensor)
                    loaded.add(key)
    return loaded, unexpected


def _dispatch(model, device_map, dtype):
    """Spread the model over devices with accelerate: ``"auto"`` (as much as fits on each GPU, then
    CPU), one device name, or an explicit module -> device dict."""
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model, no_split_module_classes=list(model._no_split_modules or []),
                                           dtype=dtype)
    elif isinstance(device_map, str):
        device_map = {"": device_map}
    return dispatch_model(model, device_map=dict(device_map))

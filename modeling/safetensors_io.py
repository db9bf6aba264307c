"""Safetensors checkpoints read and written one tensor at a time, for models larger than memory.

`SafetensorsCheckpoint` answers "which tensors, of what shape and dtype, in which shard" from the shards'
headers alone (the index json's ``weight_map``, or a single ``model.safetensors``) and reads one tensor at a
time with ``safetensors.safe_open``, each read in its own short-lived handle: the file is memory-mapped, and
pages touched through a mapping count in the process's resident set until it is closed, so a handle kept
open over a whole shard would make the shard's size, not one tensor's, the cost of reading it.

`write_safetensors` writes a file in the safetensors layout (an 8-byte little-endian header length, a JSON
header of names, dtypes, shapes and byte offsets, padded to 8 bytes, then the raw tensors in header order)
from a list of `TensorEntry` whose bytes are produced one at a time, so that no more than one tensor is in
memory while a shard of any size is written. ``safetensors.torch.save_file`` needs the whole shard as a dict.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from depthbench.errors import ConfigError

#: Names transformers gives a sharded checkpoint's index and a single-file checkpoint.
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: The safetensors dtype codes of the torch dtypes a checkpoint may hold.
DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
#: Other weight files, named in the refusal of a directory without safetensors.
OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack")


class SafetensorsCheckpoint:
    """The tensors of a local transformers checkpoint directory in safetensors format."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise ConfigError(f"{index}: unreadable safetensors index ({err})") from err
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = {key: SINGLE_FILE for key in _header(self.directory / SINGLE_FILE)}
        else:
            others = sorted({p.name for pattern in OTHER_WEIGHT_PATTERNS for p in self.directory.glob(pattern)})
            found = f" (found {', '.join(others[:4])})" if others else ""
            raise ConfigError(f"model.name_or_path={str(self.directory)!r} has no safetensors checkpoint{found}; "
                              f"model.layerwise=true reads {INDEX_FILE} with its shards or {SINGLE_FILE} (convert "
                              "the weights with save_pretrained(safe_serialization=True))")
        missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
        if missing:
            raise ConfigError(f"{index}: shards {missing[:3]} named in the weight_map are missing")
        self.weight_map: dict[str, str] = dict(weight_map)
        self._headers: dict[str, dict] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The stored dtype and shape of ``key`` (from its shard's header; no tensor is read)."""
        shard = self.weight_map[key]
        if shard not in self._headers:
            self._headers[shard] = _header(self.directory / shard)
        entry = self._headers[shard][key]
        if entry["dtype"] not in CODE_DTYPES:
            raise ConfigError(f"{shard}: tensor {key} has dtype {entry['dtype']}; supported: "
                              f"{', '.join(CODE_DTYPES)}")
        return CODE_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a copy in memory; its shard's mapping is closed again)."""
        from safetensors import safe_open

        with safe_open(str(self.directory / self.weight_map[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def _header(path: Path) -> dict:
    """The tensors of one safetensors file, from its header: ``{name: {dtype, shape, data_offsets}}``."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", size_bytes)
        try:
            header = json.loads(f.read(size))
        except ValueError as err:
            raise ConfigError(f"{path}: not a safetensors file ({err})") from err
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file being written: its name, dtype and shape, and how to produce it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: str | Path, entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[TensorEntry], None] | None = None) -> int:
    """Write ``entries`` to ``path`` in the safetensors layout, producing and writing one tensor at a time;
    returns the bytes of tensor data. A produced tensor of another dtype or shape than declared raises
    (nothing is cast silently). ``on_tensor`` is called after each tensor (progress)."""
    entries = list(entries)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for entry in entries:
        if entry.dtype not in DTYPE_CODES:
            raise ValueError(f"{entry.name}: dtype {entry.dtype} cannot be written to safetensors")
        header[entry.name] = {"dtype": DTYPE_CODES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry in entries:
            tensor = entry.produce()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(f"{entry.name}: produced {tensor.dtype} {tuple(tensor.shape)}, declared "
                                 f"{entry.dtype} {entry.shape}")
            f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
            if on_tensor is not None:
                on_tensor(entry)
    return offset


def shard_entries(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """``entries`` in order, cut into consecutive shards of at most ``max_shard_bytes`` (a larger tensor gets a
    shard of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def write_sharded(directory: str | Path, entries: list[TensorEntry], max_shard_bytes: int,
                  on_tensor: Callable[[TensorEntry], None] | None = None) -> dict:
    """Write ``entries`` into ``directory`` as transformers' sharded layout (``model-0000i-of-0000n.safetensors``
    and ``model.safetensors.index.json``), one tensor in memory at a time; returns the index."""
    directory = Path(directory)
    shards = shard_entries(entries, max_shard_bytes)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(directory / name, shard, on_tensor=on_tensor)
        weight_map.update({entry.name: name for entry in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index

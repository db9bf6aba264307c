"""Every layer's activations from one calibration pass, on disk, replayed instead of re-running the model.

The score pass of a method that also fits something (ReplaceMe-LS's moments, ReplaceMe-cosine's
token rows, LLM-Streamline's training pairs) has every hook point in hand once: the residual
stream ``h_k`` entering each layer (k = 0..L) and each layer's MLP output ``M_k``. An
`ActivationWriter` appends them, batch by batch and in the model's dtype, to one file per hook
point. What the fit needs is known only after selection, so instead of a second (partial) forward
pass the fit `replay`s the few files it needs: each batch's tensors are read back with their
original shape and mask and handed to the statistics exactly as `collect` hands them after a
forward pass, so a statistic cannot tell the two apart.

- Files are written with plain ``write`` calls, never through a memory map, and read with
  ``numpy.fromfile``: they sit in the page cache, not in the process's resident memory.
- A store is complete only once its manifest (shapes, dtype and a CRC-32 per file) is in place:
  it is written to a temporary directory and renamed, so a killed pass leaves no half store (and
  the next writer deletes temporary stores whose writing process is gone: on this host by its pid,
  on any host once it takes over the dead writer's stale lock, see `depthbench.calibration.cache`).
  Files are checked against their CRC before replay; a damaged store is deleted and recomputed.
- Size: (2L + 1) x tokens x hidden x bytes per element (2.3 GB for SmolLM2-135M on 128 x 256
  bfloat16 tokens). `ActivationSlot.budget_bytes` caps it; above the cap nothing is stored and
  fits fall back to their own forward pass.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from depthbench.calibration.statistics import (
    MLP_OUT, RESIDUAL, BatchActivations, HookPoint, Statistic, check_finite,
)

log = logging.getLogger(__name__)

#: Bump when the file layout changes, so stores written by older code are not replayed.
STORE_VERSION = 1
#: Names of store directories in a statistics cache (``activations-<key>``; temporary: ``.activations-<key>.*``).
STORE_PREFIX = "activations-"
_MANIFEST = "manifest.json"


def all_hook_points(num_layers: int) -> list[HookPoint]:
    return [(RESIDUAL, k) for k in range(num_layers + 1)] + [(MLP_OUT, k) for k in range(num_layers)]


def _file_name(point: HookPoint) -> str:
    return f"{point[0]}_{point[1]}.bin"


#: ``cache.activations_gb: auto``: this share of the free space of the file system holding the store,
#: at least `AUTO_FLOOR_BYTES`, never more than `AUTO_MAX_SHARE` of the free space.
AUTO_SHARE = 0.5
AUTO_FLOOR_BYTES = 4 * 1024**3
AUTO_MAX_SHARE = 0.9


def auto_budget(directory: str | os.PathLike) -> int:
    """The ``auto`` store budget for a store written under ``directory`` (which need not exist yet):
    half the free space of its file system, at least 4 GiB unless that is over 90% of the free space."""
    path = Path(directory).absolute()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    return int(min(max(AUTO_SHARE * free, AUTO_FLOOR_BYTES), AUTO_MAX_SHARE * free))


def store_bytes(num_layers: int, hidden_size: int, dtype: torch.dtype, batches: list[dict]) -> int:
    """Bytes a store of this model and calibration data occupies on disk."""
    positions = sum(int(b["input_ids"].numel()) for b in batches)
    element = torch.empty((), dtype=dtype).element_size()
    return len(all_hook_points(num_layers)) * positions * hidden_size * element


@dataclass(frozen=True)
class ActivationSlot:
    """Where the store of one (model, calibration data) lives or would live, and its size cap."""

    directory: Path
    budget_bytes: int
    where = "disk"

    def open(self) -> "ActivationStore | None":
        """The complete store in this slot, or ``None`` (a damaged one is deleted)."""
        if not (self.directory / _MANIFEST).is_file():
            return None
        try:
            return ActivationStore(self.directory)
        except (OSError, ValueError, KeyError) as err:
            log.warning("stored activations in %s are unusable (%s); recomputing", self.directory, err)
            self.discard()
            return None

    def complete(self) -> bool:
        """Whether a finished store is in place (renamed in with its manifest: never a partial one)."""
        return (self.directory / _MANIFEST).is_file()

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def store_size(self, adapter, batches: list[dict]) -> int:
        """Bytes the store of this model (in its dtype) and these batches takes on disk."""
        return store_bytes(adapter.num_layers, adapter.hidden_size, adapter.embeddings().weight.dtype, batches)

    def admits(self, size: int) -> bool:
        return size <= self.budget_bytes

    def writer(self, adapter, batches: list[dict]) -> "ActivationWriter | None":
        """A writer for this slot, or ``None`` when the store would exceed the budget."""
        size = self.store_size(adapter, batches)
        if not self.admits(size):
            log.info("not storing calibration activations: %.2f GB > budget %.2f GB (fits run their own pass)",
                     size / 1e9, self.budget_bytes / 1e9)
            return None
        return ActivationWriter(self.directory, adapter.num_layers, adapter.hidden_size,
                                adapter.embeddings().weight.dtype)


def _host_prefix(directory: Path) -> str:
    """Temporary stores for ``directory`` written on this host start with this (then the pid)."""
    return f".{directory.name}.{socket.gethostname()}."


def _tmp_prefix(directory: Path, pid: int) -> str:
    return f"{_host_prefix(directory)}{pid}."


def remove_abandoned_writes(directory: Path) -> list[Path]:
    """Delete temporary stores for ``directory`` left by writers on this host that no longer run
    (a pass killed with SIGKILL never reaches its clean-up); returns what was deleted. A writer on
    another host, or still running here, is left alone."""
    removed = []
    host_prefix = _host_prefix(directory)
    for candidate in directory.parent.glob(f"{host_prefix}*"):
        pid = candidate.name[len(host_prefix):].split(".", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def remove_writes_of(directory: Path, host: str, pid: int) -> list[Path]:
    """Delete the temporary stores for ``directory`` written by ``host:pid``, a writer whose stale lock
    was taken over (it may run on another host: its process table is not consulted)."""
    removed = []
    for candidate in Path(directory).parent.glob(f".{Path(directory).name}.{host}.{pid}.*"):
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def remove_stores(statistics_dir: Path) -> int:
    """Delete every activation store (complete or temporary) in a statistics cache directory, leaving
    the statistics themselves; returns the bytes freed. Only for when no writer or reader can run."""
    freed = 0
    directory = Path(statistics_dir)
    for store in [*directory.glob(f"{STORE_PREFIX}*"), *directory.glob(f".{STORE_PREFIX}*")]:
        if store.is_dir():
            freed += sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
            shutil.rmtree(store, ignore_errors=True)
    return freed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes on the host, flat (``uint8``): what the store writes and a spill file holds."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def append_bytes(f, tensor: torch.Tensor, crc: int) -> tuple[int, int]:
    """Append ``tensor``'s host bytes to the open file ``f``: ``(running CRC-32, bytes written)`` (the store
    writer's step; `depthbench.calibration.strategy` times it on the first batch)."""
    raw = host_bytes(tensor)
    f.write(raw.data)
    return zlib.crc32(raw, crc), raw.nbytes


def batch_shape(batch: BatchActivations, points: list[HookPoint]) -> tuple[int, int]:
    """``(B, T)`` of a batch, from the first of the stored points."""
    first = batch.points[points[0]]
    return int(first.shape[0]), int(first.shape[1])


def checked_points(batch: BatchActivations, points: list[HookPoint], dtype: torch.dtype,
                   hidden_size: int) -> Iterable[tuple[HookPoint, torch.Tensor]]:
    """``(point, activation)`` for every point of a store, each checked to be ``[B, T, hidden]`` in the store's
    dtype (what a store on disk or in memory keeps); `ValueError` naming the point otherwise."""
    b, t = batch_shape(batch, points)
    for point in points:
        x = batch.points[point]
        if x.dtype != dtype or tuple(x.shape) != (b, t, hidden_size):
            raise ValueError(f"activation {point} has dtype {x.dtype} and shape {tuple(x.shape)}; expected "
                             f"{dtype} and {(b, t, hidden_size)}")
        yield point, x


class ActivationWriter(Statistic):
    """Appends every hook point of every batch to its file; `commit` makes the store visible."""

    cacheable = False

    def __init__(self, directory: Path, num_layers: int, hidden_size: int, dtype: torch.dtype):
        self.directory = Path(directory)
        self.num_layers, self.hidden_size, self.dtype = num_layers, hidden_size, dtype
        self.points = all_hook_points(num_layers)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_writes(self.directory)
        self.tmp = Path(tempfile.mkdtemp(dir=self.directory.parent, prefix=_tmp_prefix(self.directory, os.getpid())))
        self.files = {p: open(self.tmp / _file_name(p), "wb") for p in self.points}
        self.crc = {p: 0 for p in self.points}
        self.shapes: list[list[int]] = []

    @property
    def key(self) -> tuple:
        return (type(self).__name__, str(self.directory))

    def hook_points(self) -> set[HookPoint]:
        return set(self.points)

    def update(self, batch: BatchActivations) -> None:
        b, t = batch_shape(batch, self.points)
        self.shapes.append([b, t])
        for point, x in checked_points(batch, self.points, self.dtype, self.hidden_size):
            self.crc[point], _ = append_bytes(self.files[point], x, self.crc[point])

    def flush_to_disk(self) -> None:
        """Push what was written so far to the disk (``fsync``) and drop it from the page cache, so that timing
        this and a read-back measures the disk, as a store of many GB meets it once the page cache's dirty
        limits are passed (`depthbench.calibration.strategy` times the first batch's write this way)."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the read-back may come from the cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def file_paths(self) -> list[Path]:
        """The files being written (in the temporary directory until `commit`), one per hook point."""
        return [self.tmp / _file_name(p) for p in self.points]

    def commit(self) -> None:
        """Close the files, write the manifest and move the store into place (atomically)."""
        for f in self.files.values():
            f.close()
        manifest = {"version": STORE_VERSION, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                    "dtype": str(self.dtype).removeprefix("torch."), "batch_shapes": self.shapes,
                    "crc32": {_file_name(p): self.crc[p] for p in self.points}}
        (self.tmp / _MANIFEST).write_text(json.dumps(manifest))
        try:
            os.rename(self.tmp, self.directory)
        except OSError:  # another process stored the same activations first: theirs is as good
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class StoredActivations:
    """What a complete store replays, wherever it lives: ``shapes`` (per batch ``(B, T)``) and ``read(point, b)``.
    On disk (`ActivationStore`) or, for a single run whose store fits in memory, held in memory
    (`depthbench.calibration.memory_store.MemoryStore`)."""

    shapes: list[tuple[int, int]]
    where: str = "disk"

    def read(self, point: HookPoint, batch_index: int) -> torch.Tensor:
        raise NotImplementedError

    def matches(self, batches: list[dict]) -> bool:
        return self.shapes == [tuple(b["input_ids"].shape) for b in batches]

    def replay(self, statistics: list[Statistic], batches: list[dict], progress: bool = True,
               description: str = "stored activations") -> list[Statistic]:
        """Feed ``statistics`` as `collect` would, reading activations instead of running the model
        (call `check` first)."""
        from tqdm.auto import tqdm

        needed = sorted(set().union(*(s.hook_points() for s in statistics)))
        for index, batch in enumerate(tqdm(batches, desc=description, unit="batch", disable=not progress,
                                           leave=False)):
            real = batch["attention_mask"].bool()
            acts = BatchActivations(points={p: self.read(p, index) for p in needed}, mask=real,
                                    last_index=real.sum(1) - 1)
            check_finite(acts)
            for stat in statistics:
                stat.update(acts)
        return statistics


class ActivationStore(StoredActivations):
    """A complete store: per hook point, every calibration batch's ``[B, T, d]`` activations."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        manifest = json.loads((self.directory / _MANIFEST).read_text())
        if manifest.get("version") != STORE_VERSION:
            raise ValueError(f"store version {manifest.get('version')}, expected {STORE_VERSION}")
        self.num_layers = int(manifest["num_layers"])
        self.hidden_size = int(manifest["hidden_size"])
        self.dtype = getattr(torch, manifest["dtype"])
        self.shapes = [tuple(s) for s in manifest["batch_shapes"]]
        self.crc = manifest["crc32"]
        self.element = torch.empty((), dtype=self.dtype).element_size()
        self.offsets = np.cumsum([0] + [b * t * self.hidden_size * self.element for b, t in self.shapes]).tolist()
        for point in all_hook_points(self.num_layers):
            size = (self.directory / _file_name(point)).stat().st_size
            if size != self.offsets[-1]:
                raise ValueError(f"{_file_name(point)} has {size} bytes, expected {self.offsets[-1]}")

    def read(self, point: HookPoint, batch_index: int) -> torch.Tensor:
        """Batch ``batch_index``'s activations at ``point``, ``[B, T, d]`` in the stored dtype."""
        b, t = self.shapes[batch_index]
        start, stop = self.offsets[batch_index], self.offsets[batch_index + 1]
        raw = np.fromfile(self.directory / _file_name(point), dtype=np.uint8, count=stop - start, offset=start)
        return torch.from_numpy(raw).view(self.dtype).view(b, t, self.hidden_size)

    def verify(self, points: Iterable[HookPoint]) -> None:
        """Raise `ValueError` if a file's CRC-32 differs from the manifest's."""
        chunk = 64 << 20
        for point in points:
            name, crc = _file_name(point), 0
            with open(self.directory / name, "rb") as f:
                while block := f.read(chunk):
                    crc = zlib.crc32(block, crc)
            if crc != self.crc[name]:
                raise ValueError(f"{name} fails its CRC-32 check")

    def check(self, statistics: list[Statistic], batches: list[dict]) -> None:
        """Raise `ValueError` unless the store can serve ``statistics`` on ``batches`` (CRCs included)."""
        if not self.matches(batches):
            raise ValueError("stored activations were written for other calibration batches")
        needed = set().union(*(s.hook_points() for s in statistics))
        unknown = needed - set(all_hook_points(self.num_layers))
        if unknown:
            raise ValueError(f"hook points {sorted(unknown)} are not stored")
        self.verify(sorted(needed))

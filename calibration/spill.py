"""Calibration statistics that keep activations as training rows instead of reducing them.

Methods that train something (ReplaceMe-cosine's transform, LLM-Streamline's replacement layer)
need the activations themselves, not a fixed-size sum. These statistics append each batch's rows to a
`RowStorage` chosen by the caller (`depthbench.calibration.service.CalibrationService.rows_storage`):

- `DeviceRows`: tensors on the model's device, allocated once for the calibration set and filled in place
  (no copy to the host, no file: on a GPU the training then reads its mini-batches without host traffic).
  Used where the rows fit what is left of the run's ``cache.activations_memory_gb``;
- `DiskRows`: float32 files in a caller-owned scratch directory, read back as `SpillArray` (read-only arrays
  whose reads do not stay resident). Holding the rows in memory does not scale (LLM-Streamline's reference
  needs more than 1 TB at paper scale), so this is the path beyond the budget.

Both hold the same float32 values, so a method trains bit for bit the same on either. Padding positions are
never written as token rows; sequence rows keep them (zero-filled) together with the mask because a layer
needs whole sequences.
"""

from __future__ import annotations

import itertools
import mmap
from pathlib import Path

import numpy as np
import torch

from depthbench.calibration.statistics import MLP_OUT, RESIDUAL, BatchActivations, HookPoint, Statistic

_instance_counter = itertools.count()


class SpillFile:
    """An append-only array file: rows of shape ``row_shape`` and dtype ``dtype``, read back as a `SpillArray`."""

    def __init__(self, path: str | Path, row_shape: tuple[int, ...], dtype=np.float32):
        self.path = Path(path)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.path.write_bytes(b"")

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().to("cpu").numpy()
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        with open(self.path, "ab") as f:
            f.write(rows.tobytes())
        self.rows += rows.shape[0]

    def open(self) -> "SpillArray":
        """A read-only array over everything appended so far, shape ``(rows, *row_shape)``."""
        if self.rows == 0:
            raise ValueError(f"{self.path.name}: nothing was spilled (no real tokens in the calibration data?)")
        return SpillArray(self.path, self.dtype, (self.rows, *self.row_shape))


class SpillArray:
    """A read-only array on a spill file whose reads do not accumulate in resident memory.

    Indexing returns a copy, as a memmap's fancy indexing does, gathered `ROWS_PER_DROP` rows at a time; after
    each piece the pages that were read are dropped from the process's resident set
    (``madvise(MADV_DONTNEED)``; they stay in the kernel's page cache, so re-reading them is still fast).
    A plain memmap keeps every page it ever touched resident, so an epoch over the rows would grow the process by
    the size of the file. The pieces matter too: a page fault maps the cached pages around it as well (the
    kernel's fault-around and read-around, 64-128 KB), so one gather of 1024 scattered rows of 2.3 KB mapped
    nearly all of a 144 MB file at once (benchmarks/spill_reads.py measures it).
    """

    #: Rows gathered between two drops of the pages read: a read maps at most about this many rows' surroundings.
    ROWS_PER_DROP = 64

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._array = np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
        self.shape, self.dtype = self._array.shape, self._array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, slice):
            rows = range(*rows.indices(self.shape[0]))
        elif isinstance(rows, (list, np.ndarray)):
            rows = np.asarray(rows)
            rows = np.flatnonzero(rows) if rows.dtype == bool and rows.shape == self.shape[:1] else rows
        gathered = (isinstance(rows, range) or (isinstance(rows, np.ndarray) and rows.ndim == 1
                                                and rows.dtype != bool)) and \
            not any(isinstance(k, (list, np.ndarray)) for k in rest)
        if not gathered:
            out = np.array(self._array[key])  # one row, or indices paired across axes: read at once
            self._drop()
            return out
        out = None
        for start in range(0, len(rows), self.ROWS_PER_DROP):
            piece = rows[start:start + self.ROWS_PER_DROP]
            if isinstance(piece, range):
                piece = slice(piece.start, piece.stop) if piece.step == 1 else np.asarray(piece)
            values = self._array[(piece, *rest)]
            if out is None:
                out = np.empty((len(rows), *values.shape[1:]), dtype=values.dtype)
            out[start:start + len(values)] = values
            self._drop()
        return out if out is not None else np.array(self._array[key])

    def _drop(self) -> None:
        """The pages read so far out of the resident set (they stay in the page cache)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


class DeviceRowFile:
    """`SpillFile`'s interface on a tensor of ``capacity`` rows allocated once on ``device``: `append` copies
    rows into it in place, `open` returns the filled rows (a view, no copy)."""

    def __init__(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype, device, capacity: int):
        self.name, self.row_shape, self.dtype = name, tuple(row_shape), dtype
        self._buffer = torch.empty((int(capacity), *self.row_shape), dtype=dtype, device=device)
        self.rows = 0

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        rows = torch.as_tensor(rows)
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.name}: rows of shape {tuple(rows.shape[1:])}, expected {self.row_shape}")
        end = self.rows + rows.shape[0]
        if end > self._buffer.shape[0]:
            raise ValueError(f"{self.name}: {end} rows exceed the {self._buffer.shape[0]} allocated for the "
                             "calibration set")
        self._buffer[self.rows:end].copy_(rows)
        self.rows = end

    def open(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError(f"{self.name}: no rows were kept (no real tokens in the calibration data?)")
        return self._buffer[:self.rows]


class DiskRows:
    """Training rows as files in ``directory`` (`SpillFile`), read back as `SpillArray`."""

    where = "disk"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    #: The file dtype and name suffix of each row dtype.
    FORMATS = {torch.float32: (np.float32, "f32"), torch.uint8: (np.uint8, "u8")}

    def file(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype, capacity: int) -> SpillFile:
        file_dtype, suffix = self.FORMATS[dtype]
        return SpillFile(self.directory / f"{name}.{suffix}", row_shape, file_dtype)


class DeviceRows:
    """Training rows as tensors on ``device`` (`DeviceRowFile`), ``capacity`` rows allocated per file."""

    where = "memory"

    def __init__(self, device):
        self.device = torch.device(device)

    def file(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype, capacity: int) -> DeviceRowFile:
        return DeviceRowFile(name, row_shape, dtype, self.device, capacity)


RowStorage = DiskRows | DeviceRows


def row_storage(where: "str | Path | RowStorage") -> RowStorage:
    """``where`` as a `RowStorage`: a directory means files in it."""
    return where if isinstance(where, (DiskRows, DeviceRows)) else DiskRows(where)


class LinearMapRows(Statistic):
    """The ReplaceMe token rows of block [s, e) with kept layer i = s - 1, spilled to disk.

    Per real token: ``M_i`` (layer i's MLP output), ``Y_i = h_{i+1} - M_i`` (the residual stream
    after layer i's attention sub-block) and ``h_e``; float32, one row per token, padding skipped.
    The same hook points as `LinearMapMoments`, but the rows rather than their moments.
    """

    COLUMNS = ("mlp_out", "attn_residual", "target")
    #: Spilled rows live in a temporary directory: nothing to keep in a statistics cache.
    cacheable = False

    def __init__(self, kept_layer: int, block_end: int, hidden_size: int, storage: "str | Path | RowStorage",
                 capacity: int = 0):
        """``capacity``: rows to allocate where ``storage`` is `DeviceRows` (the calibration set's real tokens)."""
        self.i, self.e = kept_layer, block_end
        self._id = next(_instance_counter)
        storage = row_storage(storage)
        self.files = {name: storage.file(f"rows_{self._id}_{name}", (hidden_size,), torch.float32, capacity)
                      for name in self.COLUMNS}

    @classmethod
    def storage_bytes(cls, tokens: int, hidden_size: int) -> int:
        """Bytes of the rows of ``tokens`` real tokens."""
        return len(cls.COLUMNS) * int(tokens) * int(hidden_size) * 4

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.i, self.e, self._id)

    @property
    def count(self) -> int:
        return self.files["mlp_out"].rows

    def hook_points(self) -> set[HookPoint]:
        return {(MLP_OUT, self.i), (RESIDUAL, self.i + 1), (RESIDUAL, self.e)}

    def update(self, batch: BatchActivations) -> None:
        m = batch.tokens(batch.mlp_out(self.i), "all")
        y = batch.tokens(batch.residual(self.i + 1), "all") - m  # float64 difference, then float32
        h = batch.tokens(batch.residual(self.e), "all")
        for name, rows in zip(self.COLUMNS, (m, y, h)):
            self.files[name].append(rows.to(torch.float32))

    def open(self) -> dict[str, "SpillArray | torch.Tensor"]:
        return {name: f.open() for name, f in self.files.items()}


class ResidualPairSequences(Statistic):
    """Whole sequences of ``h_j`` and ``h_k`` (plus the mask), spilled to disk, in batch order.

    Sequences are zero-padded to ``width`` positions so that every row has the same shape; the
    mask (True at real tokens) says which positions count. Used to train a module standing in for
    layers [j, k) on (input, target) pairs with the same attention pattern as in the full model.
    """

    cacheable = False

    def __init__(self, input_point: int, target_point: int, hidden_size: int, width: int,
                 storage: "str | Path | RowStorage", capacity: int = 0):
        """``capacity``: sequences to allocate where ``storage`` is `DeviceRows` (the calibration set's)."""
        self.j, self.k, self.width = input_point, target_point, width
        self._id = next(_instance_counter)
        storage = row_storage(storage)
        self.inputs = storage.file(f"seq_{self._id}_input", (width, hidden_size), torch.float32, capacity)
        self.targets = storage.file(f"seq_{self._id}_target", (width, hidden_size), torch.float32, capacity)
        self.mask = storage.file(f"seq_{self._id}_mask", (width,), torch.uint8, capacity)

    @staticmethod
    def storage_bytes(sequences: int, width: int, hidden_size: int) -> int:
        """Bytes of ``sequences`` padded to ``width``: inputs and targets in float32, the mask in bytes."""
        return int(sequences) * int(width) * (2 * int(hidden_size) * 4 + 1)

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.j, self.k, self._id)

    @property
    def count(self) -> int:
        return self.inputs.rows

    def hook_points(self) -> set[HookPoint]:
        return {(RESIDUAL, self.j), (RESIDUAL, self.k)}

    def update(self, batch: BatchActivations) -> None:
        mask = batch.mask
        b, t = mask.shape
        if t > self.width:
            raise ValueError(f"batch of {t} positions is wider than the spill width {self.width}")
        for point, spill in ((self.j, self.inputs), (self.k, self.targets)):
            x = batch.residual(point).detach().to(torch.float32)
            padded = torch.zeros(b, self.width, x.shape[-1], dtype=torch.float32, device=x.device)
            padded[:, :t] = x * mask.to(x.device)[..., None]
            spill.append(padded)
        m = torch.zeros(b, self.width, dtype=torch.uint8, device=mask.device)
        m[:, :t] = mask.to(torch.uint8)
        self.mask.append(m)

    def open(self) -> dict[str, "SpillArray | torch.Tensor"]:
        return {"input": self.inputs.open(), "target": self.targets.open(), "mask": self.mask.open()}

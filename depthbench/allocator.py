"""The C allocator's settings for a run: freed memory is kept for reuse instead of being returned to the kernel.

PyTorch's CPU tensors come from the C library's malloc. glibc's defaults adapt two thresholds as a program runs: a
block at or above the mmap threshold gets pages of its own, unmapped when freed, and free memory at the top of the
heap beyond the trim threshold (twice the mmap threshold) is returned to the kernel. A loop that allocates and frees
temporaries of a few MiB (a log-softmax over a vocabulary, a chunk of positions at a time) then has the kernel map,
zero and fault in the same memory again at every iteration: FinerCut's candidate scoring spent more time in the
kernel than in arithmetic (benchmarks/chunk_faults.py measures it). `keep_freed_memory` fixes both thresholds, once
per process, where the C library is glibc:

- ``mmap_threshold`` 32 MiB (glibc's own upper bound for the adaptive value): blocks below it come from the heap;
  a larger one (a model's weights, a batch's logits) still gets its own pages and goes back when freed;
- ``trim_threshold`` 256 MiB: at most that much free memory at the top of the heap stays with the process for the
  next allocation.

Peak memory does not change (memory is reused, not added); what stays resident after a peak may, by at most the
trim threshold. `settings` is what a result records (``provenance.malloc``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_applied: dict | None = None


def keep_freed_memory() -> dict | None:
    """Set glibc's thresholds for this process (the first call; later calls return the same); the settings, or None
    where the C library is not glibc (macOS, musl) or refused them."""
    global _applied
    if _applied is not None or platform.system() != "Linux":
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc
        return None
    version.restype = ctypes.c_char_p
    if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return None
    _applied = {"library": f"glibc {version().decode()}", "mmap_threshold": MMAP_THRESHOLD,
                "trim_threshold": TRIM_THRESHOLD}
    return _applied


def settings() -> dict | None:
    """What `keep_freed_memory` set in this process (None: nothing, the C library's defaults)."""
    return _applied

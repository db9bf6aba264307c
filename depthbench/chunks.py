"""How many rows of a ``[rows x width]`` computation to take at once (a log-softmax over a vocabulary, say).

On a CPU, few: a temporary of a few MiB is served again and again from malloc's free lists, while one above glibc's
mmap threshold (32 MiB at most) is mapped fresh at every allocation and unmapped at every free, so each use faults
in, and the kernel zeroes, all its pages again. FinerCut's candidate scoring on SmolLM2 (64 MiB float64 chunks of a
49,152-token vocabulary) spent more time in the kernel than in arithmetic that way (benchmarks/chunk_faults.py).
On a GPU, many: its caching allocator keeps freed blocks, and fewer, larger kernels run faster.
"""

from __future__ import annotations

import torch

#: Bytes of one chunk's widest temporary on a CPU, and on any other device.
CPU_CHUNK_BYTES = 4 << 20
DEVICE_CHUNK_BYTES = 64 << 20


def chunk_rows(width: int, device: torch.device | str, element_bytes: int = 8) -> int:
    """Rows per chunk of a computation whose temporaries are ``width`` elements of ``element_bytes`` per row (at
    least one row)."""
    budget = CPU_CHUNK_BYTES if torch.device(device).type == "cpu" else DEVICE_CHUNK_BYTES
    return max(1, budget // (max(1, int(width)) * int(element_bytes)))

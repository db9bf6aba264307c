"""The C allocator's settings (depthbench.allocator): applied once per process where the C library is glibc, and
recorded with every result; read back from glibc itself, not from the module's own note."""

import ctypes
import platform
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.skipif(platform.system() != "Linux" or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
                    reason="glibc only")
def test_a_run_keeps_freed_memory_and_records_it():
    """In a fresh process: before, glibc's defaults (an allocation of 4 MiB gets its own pages, so freeing it shrinks
    the mapped memory); after `keep_freed_memory`, the same allocation comes from the heap and stays there for reuse
    (malloc_info's reports, before and after a malloc/free of 4 MiB). The provenance names the settings."""
    script = """
import ctypes, json
from depthbench import allocator
from depthbench.provenance import provenance
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc.mallinfo2.restype = Mallinfo2

def mapped_while_held():
    p = libc.malloc(4 << 20)
    info = libc.mallinfo2()
    libc.free(p)
    return info.hblkhd  # bytes in blocks of their own pages (mmap)

before = mapped_while_held()
settings = allocator.keep_freed_memory()
again = allocator.keep_freed_memory()
after = mapped_while_held()
print(json.dumps({"before": before, "after": after, "settings": settings, "same": again is settings,
                  "recorded": provenance()["malloc"]}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] >= 4 << 20  # glibc's default: a 4 MiB block is mapped on its own
    assert out["after"] < 4 << 20  # now it comes from the heap
    assert out["settings"]["mmap_threshold"] == 32 << 20 and out["settings"]["trim_threshold"] == 256 << 20
    assert out["settings"]["library"].startswith("glibc ") and out["same"] and out["recorded"] == out["settings"]

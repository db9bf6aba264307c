"""The newcomer's path, timed: what README.md and docs/PLUGINS.md tell a new user to type, from a fresh clone.

    .venv/bin/python benchmarks/newcomer_path.py [--repo .] [--output docs/newcomer_path.json]

Steps, each a shell command run in a fresh ``git clone`` of ``--repo`` (its committed HEAD) in a temporary
directory, with pip's cache off (a new machine has none) and no Hugging Face Hub access:

1. ``make install`` (README "Install": a new .venv, torch first, the offline model and data);
2. ``depthbench pruner=shortgpt scale=fast benchmark=none logger=none`` (README "Your first run");
3. ``pip install ./examples/residual_map_pruner`` (docs/PLUGINS.md, template 2: scores from calibration
   statistics and adds parameters through the surgery API);
4. ``depthbench pruner=example_residual_map scale=fast benchmark=none logger=none`` (its first run).

Commands run with ``.venv/bin/`` in front, as the guide's "activate the venv" makes them. The first run includes
the one-time conversion of the packaged GGUF to a transformers model (cached for later runs), as a newcomer meets
it. Each step must succeed; the record holds every step's wall time and the total. One run: the machine is
shared, so read the total against the 10-minute goal with the load average recorded beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from depthbench.benchmarks._record import emit, machine_fields

FAST = "scale=fast benchmark=none logger=none"
STEPS = [
    ("install", "make install"),
    ("first_run", f".venv/bin/depthbench pruner=shortgpt {FAST}"),
    ("plugin_install", ".venv/bin/pip install -q ./examples/residual_map_pruner"),
    ("plugin_run", f".venv/bin/depthbench pruner=example_residual_map {FAST}"),
]
GOAL_SECONDS = 600


def run_steps(clone: Path, env: dict) -> list[dict]:
    rows = []
    for name, command in STEPS:
        start = time.perf_counter()
        proc = subprocess.run(command, shell=True, cwd=clone, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(f"{name}: {seconds:.1f} s (exit {proc.returncode})", flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"step {name!r} ({command}) failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}")
        rows.append({"step": name, "command": command, "seconds": round(seconds, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the checkout to clone (its committed HEAD)")
    parser.add_argument("--output", default=None, help="JSON record to write (default: print only)")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="depthbench-newcomer-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "DEPTHBENCH_"))}
    env.update({"PIP_NO_CACHE_DIR": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HOME": str(work / "hf-home"), "XDG_CACHE_HOME": str(work / "cache"),
                "DEPTHBENCH_CACHE": str(work / "depthbench-cache")})  # an empty user cache (GGUF not yet converted)
    try:
        clone = work / "depthbench"
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
        rows = run_steps(clone, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(r["seconds"] for r in rows)
    emit({"what": "README + docs/PLUGINS.md path from a fresh clone: install, one method, a statistics-based plugin "
                  "(pip cache off, nothing cached)",
          "commit": commit, "steps": rows, "total_seconds": round(total, 1), "goal_seconds": GOAL_SECONDS,
          "within_goal": total < GOAL_SECONDS, **machine_fields()}, args.output)


if __name__ == "__main__":
    main()

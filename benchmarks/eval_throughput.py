"""Evaluation throughput: tokens scored per second by depthbench's lm-eval path against the model's
bare forward pass on the same tokens, on the same machine, in one process.

    .venv/bin/python benchmarks/eval_throughput.py [--task NAME] [--limit 40] [--batch-size N] [--repeats 3]

The lm-eval path is `depthbench.evaluation.lm_eval_runner.evaluate_benchmark` on one task of the default
benchmark (lm-eval's requests, batching, sorting, padding, log-softmax and scoring included; the task's
dataset is built once before timing, so the timed runs measure scoring, not data loading). A spy on the
model's forward records every token row lm-eval feeds it (trailing right-padding stripped); the bare
baseline runs exactly those rows through ``model(...)`` in lm-eval's batch size, sorted by length
(least padding), with nothing else. Tokens scored = the recorded rows' real tokens. Runs alternate
(lm-eval, bare, bare, lm-eval, ...) and the ratio is the median of the per-round ratios.

Writes the ``eval_throughput`` part of docs/performance.json and re-renders docs/PERFORMANCE.md
(`benchmarks/performance.py` renders this part with `render_part`). The machine is shared: read the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.7


class ForwardSpy:
    """Wraps ``model.forward``: records the real (un-padded) token rows of every call and its time."""

    def __init__(self, model):
        self.model, self.original = model, model.forward
        self.rows: list[torch.Tensor] = []
        self.seconds = 0.0

    def __enter__(self):
        def spy(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            for row in ids:
                nonzero = torch.nonzero(row).flatten()
                self.rows.append(row[: int(nonzero[-1]) + 1].clone() if len(nonzero) else row[:1].clone())
            start = time.perf_counter()
            out = self.original(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        self.model.forward = spy
        return self

    def __exit__(self, *exc):
        self.model.forward = self.original


@torch.inference_mode()
def bare_forward(model, rows: list[torch.Tensor], batch_size: int, pad_id: int) -> float:
    """Seconds to run ``rows`` through the model, longest first, ``batch_size`` rows per call."""
    ordered = sorted(rows, key=len, reverse=True)
    start = time.perf_counter()
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for r, row in enumerate(chunk):
            ids[r, :len(row)] = row
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def measure(args) -> dict:
    from omegaconf import OmegaConf

    from depthbench.evaluation.lm_eval_runner import evaluate_benchmark, parse_benchmark
    from depthbench.modeling.loading import default_cache_dir, load_model
    from depthbench.benchmarks._config import compose

    cfg = compose(*args.overrides)
    bench = OmegaConf.to_container(cfg.benchmark, resolve=True)
    specs = parse_benchmark(bench)
    name = args.task or specs[0].name
    task = next((t for t in bench["tasks"] if (t if isinstance(t, str) else t["name"]) == name), None)
    if task is None:
        raise SystemExit(f"task {name!r} is not in benchmark {bench.get('name')!r}: {[s.name for s in specs]}")
    batch_size = args.batch_size or bench.get("batch_size", 8)
    one = {**bench, "tasks": [task], "limit": args.limit, "batch_size": batch_size}
    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    data_dir = default_cache_dir()
    # warm-up: the task's dataset built and cached, lm-eval's task index loaded
    evaluate_benchmark(model, tokenizer, {**one, "limit": 2}, data_dir, progress=False)
    rounds = []
    for r in range(args.repeats):
        def lm_eval_run():
            with ForwardSpy(model) as spy:
                start = time.perf_counter()
                evaluate_benchmark(model, tokenizer, one, data_dir, progress=False)
                return time.perf_counter() - start, spy

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if r % 2 == 0:
            lm_seconds, spy = lm_eval_run()
            bare = bare_forward(model, spy.rows, batch_size, pad)
        else:
            # the rows are the same every run (same task, limit, order): take them from the previous round
            bare = bare_forward(model, rounds[-1]["rows"], batch_size, pad)
            lm_seconds, spy = lm_eval_run()
        tokens = sum(len(row) for row in spy.rows)
        rounds.append({"rows": spy.rows, "lm_eval_s": lm_seconds, "lm_eval_forward_s": spy.seconds, "bare_s": bare,
                       "tokens": tokens})
    ratios = [x["bare_s"] / x["lm_eval_s"] for x in rounds]
    tokens = rounds[-1]["tokens"]
    med = statistics.median
    return {
        "task": name, "limit": args.limit, "batch_size": batch_size, "rows": len(rounds[-1]["rows"]),
        "tokens": tokens, "repeats": args.repeats, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "lm_eval_tokens_per_s": tokens / med(x["lm_eval_s"] for x in rounds),
        "bare_tokens_per_s": tokens / med(x["bare_s"] for x in rounds),
        "forward_share_of_lm_eval": med(x["lm_eval_forward_s"] / x["lm_eval_s"] for x in rounds),
        "ratio": med(ratios), "ratios": ratios, "target": TARGET,
    }


def render_part(part: dict, verdicts: list) -> list[str]:
    """The section of docs/PERFORMANCE.md (called by benchmarks/performance.py's render)."""
    env = part["environment"]
    verdicts.append((f"lm-eval path scores >= {TARGET}x the bare forward's tokens/s ({part['task']})",
                     f"{part['ratio']:.2f}x", part["ratio"] >= TARGET))
    return [
        f"## Evaluation throughput ({part['task']}, limit {part['limit']}, batch {part['batch_size']})", "",
        f"Measured {env['date']} at commit {env['commit']} on {env['machine']}, {env['cpus']} CPUs, Python "
        f"{env['python']}, torch {env['torch']}, by `{env['command']}`.", "",
        "Tokens scored per second by depthbench's lm-eval path (`evaluate_benchmark`, requests to scores) "
        "against a bare forward pass over the same token rows (recorded from lm-eval's calls, same batch size, "
        "sorted by length), alternating in one process; ratio = median of per-round ratios (each round times both "
        "paths back to back, so a load change between rounds cancels; the tokens/s columns are medians over rounds "
        "taken separately and need not give the ratio).", "",
        "| rows | tokens | lm-eval tokens/s | bare forward tokens/s | ratio | per-round ratios | forward share of "
        "lm-eval time | rounds |",
        "|---|---|---|---|---|---|---|---|",
        f"| {part['rows']} | {part['tokens']} | {part['lm_eval_tokens_per_s']:.0f} | {part['bare_tokens_per_s']:.0f} | "
        f"{part['ratio']:.2f}x | {', '.join(f'{r:.2f}' for r in part.get('ratios', []))} | "
        f"{100 * part['forward_share_of_lm_eval']:.0f}% | {part['repeats']} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default=None, help="a task of the benchmark (default: its first)")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the benchmark's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(ROOT / "docs" / "performance.json"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. benchmark=offline model.dtype=float32")
    args = parser.parse_args()
    from depthbench.benchmarks import performance

    from depthbench import atomic

    part = measure(args)
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    env = performance.environment(sys.argv[1:])
    env["command"] = "python benchmarks/eval_throughput.py " + " ".join(sys.argv[1:])
    results["eval_throughput"] = {"environment": env, **part}
    atomic.write_text(results_path, json.dumps(results, indent=1) + "\n")
    atomic.write_text(Path(args.output), performance.render(results))
    print(json.dumps({k: v for k, v in part.items() if k != "ratios"}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

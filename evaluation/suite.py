"""Everything measured on one model: held-out perplexity and the lm-eval benchmark (cacheable for
the base model), plus speed (never cached: base and pruned are timed in the same process)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from depthbench.evaluation.efficiency import measure_speed
from depthbench.evaluation.perplexity import perplexity


def has_benchmark(benchmark_cfg) -> bool:
    return bool(benchmark_cfg is not None and benchmark_cfg.get("tasks"))


def quality(model, tokenizer, windows, benchmark_cfg, data_dir: Path, progress: bool, label: str) -> dict:
    """Held-out perplexity and, when the benchmark lists tasks, its lm-eval scores."""
    out = {"heldout_perplexity": perplexity(model, windows.batches, progress, f"{label} perplexity")}
    if has_benchmark(benchmark_cfg):
        from depthbench.evaluation.lm_eval_runner import evaluate_benchmark

        bench = evaluate_benchmark(model, tokenizer, benchmark_cfg, data_dir, progress)
        out["benchmark"] = bench
        out["tasks"] = {name: task["value"] for name, task in bench["tasks"].items()}
        out["average"] = bench["average"]
    return out


def speed(model, tokenizer, cfg: DictConfig) -> dict | None:
    if not cfg.get("enabled", True):
        return None
    return measure_speed(model, tokenizer, prompt_len=int(cfg.prompt_len), new_tokens=int(cfg.new_tokens),
                         batch_size=int(cfg.batch_size), repeats=int(cfg.repeats))

"""Everything measured on one model: held-out perplexity and the lm-eval benchmark (cacheable for
the base model), fidelity of the pruned model to the dense one (the dense side cached), plus speed
(never cached: base and pruned are timed interleaved in the same process)."""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from depthbench.errors import ConfigError
from depthbench.evaluation.efficiency import check_speed_settings, measure_speedup
from depthbench.evaluation.perplexity import perplexity


def has_benchmark(benchmark_cfg) -> bool:
    return bool(benchmark_cfg is not None and benchmark_cfg.get("tasks"))


def check_evaluation(evaluation_cfg: DictConfig, efficiency_cfg: DictConfig | None = None) -> None:
    """Cheap checks before any weights: the held-out text, fidelity and speed options."""
    from depthbench.calibration.sources import build_source
    from depthbench.evaluation.fidelity import check_top_k

    if "path" in evaluation_cfg.keys() and OmegaConf.is_missing(evaluation_cfg, "path"):
        raise ConfigError("evaluation=local needs evaluation.path=FILE (.txt, .jsonl or .parquet)")
    build_source(evaluation_cfg.perplexity).check()
    if fidelity_enabled(evaluation_cfg):
        check_top_k(evaluation_cfg.fidelity.top_k)
    if efficiency_cfg is not None and efficiency_cfg.enabled:
        check_speed_settings(**speed_settings(efficiency_cfg))


def speed_settings(cfg: DictConfig) -> dict:
    return {"prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "batch_size": cfg.batch_size,
            "min_rounds": cfg.repeats, "max_rounds": cfg.max_rounds, "rel_width": cfg.rel_width,
            "budget_s": cfg.budget_s}


def fidelity_enabled(evaluation_cfg: DictConfig) -> bool:
    """``evaluation.fidelity.enabled`` (typed by `depthbench.settings.FidelitySettings`, which holds its default)."""
    return bool(evaluation_cfg.fidelity.enabled)


def quality(model, tokenizer, windows, benchmark_cfg, data_dir: Path, progress: bool, label: str,
            reference=None, base_quality: dict | None = None, heldout: dict | None = None) -> tuple[dict, dict | None]:
    """``(quality, fidelity)`` of ``model``: held-out perplexity and, when the benchmark lists tasks, its lm-eval
    scores; with the dense model's fidelity ``reference``, the token fidelity from the SAME forward passes as the
    perplexity (one pass over the held-out windows, not two) and the flips per task against ``base_quality``.
    ``heldout``: the held-out perplexity already known (the dense model's, read from its reference)."""
    from depthbench.evaluation.fidelity import perplexity_and_fidelity, task_flips

    fidelity = None
    if heldout is None and reference is not None:
        heldout, fidelity = perplexity_and_fidelity(model, windows.batches, reference, progress,
                                                    f"{label} perplexity and fidelity")
    elif heldout is None:
        heldout = perplexity(model, windows.batches, progress, f"{label} perplexity")
    out = {"heldout_perplexity": heldout}
    if has_benchmark(benchmark_cfg):
        from depthbench.evaluation.lm_eval_runner import evaluate_benchmark

        bench = evaluate_benchmark(model, tokenizer, benchmark_cfg, data_dir, progress)
        out["benchmark"] = bench
        if bench["tasks"]:  # accuracy tasks; a benchmark of bits-per-byte tasks only has none to average or retain
            out["tasks"] = {name: task["value"] for name, task in bench["tasks"].items()}
            out["average"] = bench["average"]
    if fidelity is not None and base_quality and "benchmark" in base_quality and "benchmark" in out:
        fidelity["flips"] = task_flips(base_quality["benchmark"], out["benchmark"])
    return out, fidelity


def fidelity_reference(model, windows, evaluation_cfg: DictConfig, cache_dir: Path | None, material: dict,
                       progress: bool, stale_after_s: float | None = None):
    """The dense model's top-k reference on the held-out windows: from the cache when ``cache_dir`` is
    given (computed and stored on a miss), else computed. ``(reference, from_cache)``."""
    from depthbench.evaluation.fidelity import cached_reference, dense_reference

    top_k = int(evaluation_cfg.fidelity.top_k)

    def compute():
        return dense_reference(model, windows.batches, top_k, progress)

    if cache_dir is None:
        return compute(), False
    return cached_reference(cache_dir, {**material, "fidelity_top_k": top_k}, compute, stale_after_s=stale_after_s)


def dense_copy(model):
    """A copy of the dense model kept for the interleaved speed measurement (pruning edits the model in
    place); ``(copy, bytes of its parameters and buffers)``."""
    clone = copy.deepcopy(model)
    size = sum(t.numel() * t.element_size() for t in list(clone.parameters()) + list(clone.buffers()))
    return clone, size


def speed(base_model, pruned_model, tokenizer, cfg: DictConfig) -> dict | None:
    """``{"base", "pruned", "speedup"}`` from `measure_speedup` with the ``efficiency`` settings."""
    if not cfg.enabled:
        return None
    return measure_speedup(base_model, pruned_model, tokenizer, **speed_settings(cfg))

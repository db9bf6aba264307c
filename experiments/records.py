"""What a result record says, read the same way by the leaderboard, its ranking and its plots.

A record is one run's ``result.json`` (`depthbench.experiments.resume`). These helpers name its parts:
the benchmark it was scored on, the healing it had, the metrics of the model the run ends with (the
healed one where it was healed), what it removed, and the group of runs that differ only in their seeds.
"""

from __future__ import annotations

from depthbench.experiments.resume import config_hash


def metric(metrics: dict, *keys, default=None):
    for key in keys:
        if not isinstance(metrics, dict) or key not in metrics:
            return default
        metrics = metrics[key]
    return metrics


def short_task_name(task: str) -> str:
    """``bigbench_date_understanding_multiple_choice`` -> ``date_understanding`` (others unchanged)."""
    return task.removeprefix("bigbench_").removesuffix("_multiple_choice")



def benchmark_key(record: dict) -> str:
    base = record.get("metrics", {}).get("base", {})
    tasks = sorted(base.get("tasks") or {}) + sorted(lower_is_better_tasks(base))
    return ",".join(short_task_name(t) for t in tasks) or "perplexity"



def module_columns(pruning: dict) -> dict:
    """Removed sub-blocks (``"K.attn"`` / ``"K.mlp"``), attention and MLP modules removed (a whole layer counts
    in both), layer-equivalents (removed decoder parameters / parameters of one layer) and the % of the KV cache
    removed. Records written before sub-blocks existed removed whole layers only: their counts are derived from
    ``removed_layers`` and the parameter counts (None where those are missing too)."""
    layers = len(pruning["removed_layers"])
    before = pruning.get("num_layers_before")
    params_before, params_after = pruning.get("parameters_before") or {}, pruning.get("parameters_after") or {}
    equivalents = pruning.get("layer_equivalents_removed")
    if equivalents is None and params_before.get("per_layer") and "without_embeddings" in params_after:
        equivalents = (params_before["without_embeddings"] - params_after["without_embeddings"]) / params_before[
            "per_layer"]
    kv = pruning.get("kv_cache_fraction_removed")
    if kv is None and "removed_attention_modules" not in pruning and before:
        kv = layers / before
    return {"removed_sub_blocks": " ".join(pruning.get("removed_sub_blocks") or []),
            "attn_removed": pruning.get("removed_attention_modules", layers),
            "mlp_removed": pruning.get("removed_mlp_modules", layers),
            "layer_equivalents": None if equivalents is None else round(equivalents, 3),
            "kv_removed_%": None if kv is None else round(100 * kv, 2)}


def seed_group(record: dict) -> str:
    """The config hash without the seeds (``seed``, ``pruner.options.seed``, and the calibration draw's and
    healing's seeds, which follow ``seed``): runs that share it differ only in their seeds. A record without its
    config is a group of its own."""
    config = record.get("config")
    if not isinstance(config, dict):
        return record["config_hash"]
    config = {**config, "seed": None}
    for group in ("healing", "calibration"):  # their seeds follow the run seed by default
        if isinstance(config.get(group), dict):
            config[group] = {k: v for k, v in config[group].items() if k != "seed"}
    pruner = config.get("pruner")
    if isinstance(pruner, dict) and isinstance(pruner.get("options"), dict):
        config["pruner"] = {**pruner, "options": {k: v for k, v in pruner["options"].items() if k != "seed"}}
    return config_hash(config)



def healing_key(record: dict) -> str:
    """What healing a run had: ``none``, or the method and its budget (runs are ranked among equals)."""
    h = record.get("healing") or {}
    method = h.get("method", "none")
    if method == "partial_layers":  # which tail trained is part of the method (k = 0 trains only the head)
        method = f"partial_layers(k={h.get('layers')})"
    return method if method == "none" else f"{method}:{h.get('steps')}:{h.get('tokens')}"


def final_metrics(record: dict) -> dict:
    """The metrics of the model a run ends with: the healed model's where it was healed, else the pruned one's."""
    metrics = record.get("metrics") or {}
    if healing_key(record) != "none" and metrics.get("healed"):
        return metrics["healed"]
    return metrics.get("pruned") or {}


def lower_is_better_tasks(quality: dict) -> dict[str, dict]:
    """task -> result of the tasks scored on a lower-is-better metric (bits per byte of gold solutions), which a
    benchmark result keeps apart from its accuracy ``tasks`` (`depthbench.evaluation.lm_eval_runner`): never in
    the task average or the retention."""
    return metric(quality, "benchmark", "lower_is_better_tasks", default=None) or {}


def final_task_results(record: dict) -> dict[str, dict]:
    """task -> result (``value``, ``metric``, ``samples``, ...) of every task, accuracy or lower-is-better, of the
    model a run ends with (healed if healed)."""
    quality = final_metrics(record)
    return {**(metric(quality, "benchmark", "tasks", default=None) or {}), **lower_is_better_tasks(quality)}


def per_example(record: dict) -> dict | None:
    """task -> per-example results of the model the run ends with (healed if healed), or None if a task has none."""
    tasks = metric(final_metrics(record), "benchmark", "tasks") or {}
    if not tasks or not all(t.get("samples") for t in tasks.values()):
        return None
    return {task: t["samples"] for task, t in tasks.items()}


def final_fidelity(record: dict) -> dict:
    """The fidelity to the dense model of the model a run ends with (``metrics.healed.fidelity`` where it was
    healed, else ``metrics.fidelity``); empty where it was not measured."""
    metrics = record.get("metrics") or {}
    if healing_key(record) != "none" and metrics.get("healed"):
        return metrics["healed"].get("fidelity") or {}
    return metrics.get("fidelity") or {}

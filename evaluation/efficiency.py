"""Efficiency: model size and generation speed, so every result shows what depth pruning buys.

`measure_speed` times a prefill (the prompt in one forward pass, filling the KV cache) and a greedy
decode (one token per step from that cache) on a fixed prompt, on one model.

`measure_speedup` is what a run reports: it times the base and the pruned model interleaved in one
process (base, pruned, pruned, base, base, pruned, ...: the order alternates each round, so a slow
drift of the machine's load hits both alike), one speed-up ratio per round, until the 95% interval
of the speed-up is narrower than ``rel_width`` (relative: hi / lo - 1) for prefill and decode, or
``max_rounds`` or ``budget_s`` is reached. The interval is a t interval on the mean log-ratio
(geometric mean of the per-round ratios). Beside it, `analytic_speedup` gives the ratio of FLOPs per
token of the two models at the measured prompt length; a measured interval that lies entirely
outside [1, limit] (a smaller model measured slower than the dense one, or faster than both its FLOPs
and the count of sub-blocks it still runs allow: `LIMIT_RULE`) is flagged ``consistent: false``.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable

import torch

from depthbench.errors import ConfigError
from depthbench.modeling.surgery import ModelSurgery

_PROMPT_TEXT = (
    "Depth pruning removes whole transformer blocks from a language model, so that every token passes "
    "through fewer layers. The model becomes smaller and faster, and the question is how much quality "
    "it keeps. "
)


def model_size(model) -> dict:
    """Parameters (total, without input embedding and output head) and decoder layers."""
    from depthbench.modeling.adapters import adapter_for

    adapter = adapter_for(model)
    counts = adapter.parameter_counts()
    return {"parameters": counts["total"], "parameters_without_embeddings": counts["without_embeddings"],
            "layers": adapter.num_layers}


def _prompt_ids(tokenizer, prompt_len: int, batch_size: int) -> torch.Tensor:
    ids = tokenizer(_PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    reps = -(-prompt_len // len(ids))
    row = torch.tensor((ids * reps)[:prompt_len], dtype=torch.long)
    return row.unsqueeze(0).repeat(batch_size, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model) -> str:
    """transformers 5.x renames ``past_key_values`` to ``cache`` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@torch.inference_mode()
def _one_run(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    device = prompt.device
    cache_kwarg = _cache_kwarg(model)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - start
    cache = _returned_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    mask = torch.ones(prompt.shape[0], prompt.shape[1] + 1, dtype=torch.long, device=device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_kwarg: cache})
        cache = _returned_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, mask[:, :1]], dim=1)
    _sync(device)
    return prefill, time.perf_counter() - start


def _check_positive_ints(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"efficiency.{name}={value!r} is not allowed; use an integer >= 1")


def measure_speed(model, tokenizer, prompt_len: int = 256, new_tokens: int = 32, batch_size: int = 1,
                  repeats: int = 3) -> dict:
    """Prefill and decode throughput in tokens per second (medians over ``repeats``, after a warm-up).

    prefill tokens/s = batch_size * prompt_len / prefill time;
    decode tokens/s = batch_size * new_tokens / time of the ``new_tokens`` single-token steps.
    """
    _check_positive_ints(prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size, repeats=repeats)
    device = next(model.parameters()).device
    prompt = _prompt_ids(tokenizer, prompt_len, batch_size).to(device)
    was_training = model.training
    model.eval()
    try:
        _one_run(model, prompt, min(new_tokens, 4))  # warm-up: allocator, kernels, lazy init
        runs = [_one_run(model, prompt, new_tokens) for _ in range(repeats)]
    finally:
        model.train(was_training)
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return _speed_record(model, prefill, decode, prompt_len, new_tokens, batch_size, repeats)


def _speed_record(model, prefill: float, decode: float, prompt_len: int, new_tokens: int, batch_size: int,
                  repeats: int) -> dict:
    device = next(model.parameters()).device
    return {
        "prefill_tokens_per_s": batch_size * prompt_len / prefill,
        "decode_tokens_per_s": batch_size * new_tokens / decode,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


def speedup(base: dict, pruned: dict) -> dict:
    """pruned / base throughput; the settings of the two measurements must match."""
    keys = ("prompt_len", "new_tokens", "batch_size", "device", "dtype")
    differ = [k for k in keys if base.get(k) != pruned.get(k)]
    if differ:
        raise ConfigError(f"speed measurements were taken with different settings: {', '.join(differ)}")
    return {
        "prefill": pruned["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
        "decode": pruned["decode_tokens_per_s"] / base["decode_tokens_per_s"],
    }


# ------------------------------------------------------------------------------------------------
# Interleaved measurement with an interval, and the analytic (FLOPs) speed-up.

def _t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def log_ratio_interval(ratios: list[float]) -> dict:
    """Geometric mean of the ratios and its 95% t interval (computed on the logs)."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = statistics.fmean(logs)
    if n < 2:
        return {"value": math.exp(mean), "interval": None, "relative_width": math.inf, "rounds": n}
    half = _t_quantile(n - 1) * statistics.stdev(logs) / math.sqrt(n)
    lo, hi = math.exp(mean - half), math.exp(mean + half)
    return {"value": math.exp(mean), "interval": [lo, hi], "relative_width": hi / lo - 1, "rounds": n}


def interleaved_speedup(run_base: Callable[[], tuple[float, float]], run_pruned: Callable[[], tuple[float, float]],
                        min_rounds: int = 3, max_rounds: int = 50, rel_width: float = 0.05, budget_s: float = 60.0,
                        clock: Callable[[], float] = time.perf_counter) -> dict:
    """Alternate ``run_base`` / ``run_pruned`` (each returns (prefill s, decode s)) for at least ``min_rounds``
    rounds, then until both speed-up intervals are narrower than ``rel_width``, ``max_rounds`` rounds ran,
    or ``budget_s`` seconds passed."""
    start = clock()
    times: dict[str, list[tuple[float, float]]] = {"base": [], "pruned": []}
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    stop = "max_rounds"
    for r in range(max_rounds):
        order = (("base", run_base), ("pruned", run_pruned))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(fn())
        (bp, bd), (pp, pd) = times["base"][-1], times["pruned"][-1]
        ratios["prefill"].append(bp / pp)
        ratios["decode"].append(bd / pd)
        summary = {kind: log_ratio_interval(v) for kind, v in ratios.items()}
        if r + 1 < min_rounds:
            continue  # the minimum is run whatever the budget
        if all(s["relative_width"] <= rel_width for s in summary.values()):
            stop = "interval"
            break
        if clock() - start >= budget_s:
            stop = "budget"
            break
    return {"times": times, "speedup": summary, "stopped_by": stop, "seconds": clock() - start}


def check_speed_settings(prompt_len, new_tokens, batch_size, min_rounds, max_rounds, rel_width, budget_s) -> None:
    """The ``efficiency`` settings, checked before any model is loaded (``repeats`` is ``min_rounds``)."""
    _check_positive_ints(prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size, repeats=min_rounds,
                         max_rounds=max_rounds)
    if isinstance(rel_width, bool) or not isinstance(rel_width, (int, float)) or not rel_width > 0:
        raise ConfigError(f"efficiency.rel_width={rel_width!r} is not allowed; use a number > 0 (e.g. 0.05)")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ConfigError(f"efficiency.budget_s={budget_s!r} is not allowed; use a number of seconds > 0")
    if max_rounds < min_rounds:
        raise ConfigError(f"efficiency.max_rounds={max_rounds} is below efficiency.repeats={min_rounds} (the minimum)")


def measure_speedup(base_model, pruned_model, tokenizer, prompt_len: int = 256, new_tokens: int = 32,
                    batch_size: int = 1, min_rounds: int = 3, max_rounds: int = 50, rel_width: float = 0.05,
                    budget_s: float = 60.0) -> dict:
    """Speed of both models and the speed-up with its interval, timed interleaved (see the module doc).

    Returns ``{"base": speed, "pruned": speed, "speedup": {...}}`` where ``speed`` is as `measure_speed`
    (medians over the rounds) and ``speedup`` holds prefill / decode ratios, intervals and the analytic ratio."""
    check_speed_settings(prompt_len, new_tokens, batch_size, min_rounds, max_rounds, rel_width, budget_s)
    device = next(base_model.parameters()).device
    prompt = _prompt_ids(tokenizer, prompt_len, batch_size).to(device)
    models = (base_model, pruned_model)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for m in models:
            _one_run(m, prompt, min(new_tokens, 4))  # warm-up
        out = interleaved_speedup(lambda: _one_run(base_model, prompt, new_tokens),
                                  lambda: _one_run(pruned_model, prompt, new_tokens),
                                  min_rounds=min_rounds, max_rounds=max_rounds, rel_width=rel_width, budget_s=budget_s)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    speeds = {}
    for name, model in zip(("base", "pruned"), models):
        runs = out["times"][name]
        prefill, decode = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        speeds[name] = _speed_record(model, prefill, decode, prompt_len, new_tokens, batch_size, len(runs))
    analytic = analytic_speedup(base_model, pruned_model, prompt_len, new_tokens)
    result = {"method": "interleaved rounds (order alternating), geometric mean of per-round ratios, 95% t interval "
                        "on log ratios", "stopped_by": out["stopped_by"], "seconds": out["seconds"],
              "rel_width_target": rel_width}
    for kind in ("prefill", "decode"):
        s = out["speedup"][kind]
        allowed = [1.0, analytic[f"{kind}_limit"]]
        consistent = s["interval"] is None or (s["interval"][1] >= allowed[0] and s["interval"][0] <= allowed[1])
        result[kind] = s["value"]
        result[f"{kind}_interval"] = s["interval"]
        result[f"{kind}_relative_width"] = s["relative_width"] if math.isfinite(s["relative_width"]) else None
        result[f"{kind}_analytic"] = analytic[kind]
        result[f"{kind}_limit"] = analytic[f"{kind}_limit"]
        result[f"{kind}_consistent"] = consistent
    result["rounds"] = len(out["times"]["base"])
    result["flops_per_token"] = analytic["flops_per_token"]
    result["sub_blocks_ratio"] = analytic["sub_blocks"]
    result["limit_rule"] = LIMIT_RULE
    return {"base": speeds["base"], "pruned": speeds["pruned"], "speedup": result}


def _linear_macs(module: torch.nn.Module) -> int:
    """Multiply-accumulates per token of every matrix multiply with a weight inside ``module``: one per weight
    element of ``nn.Linear``, transformers' ``Conv1D`` and the modules pruning adds (LinearPatch's
    `ResidualPatch`); removed sub-blocks' stand-ins hold no weight and count 0."""
    from depthbench.modeling.modules import ResidualPatch

    total = 0
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, ResidualPatch)) or type(sub).__name__ == "Conv1D":
            total += sub.weight.numel()
    return total


def _running_sub_blocks(model) -> tuple[list[bool], int]:
    """Per decoder layer whether its attention runs, and how many attention and MLP sub-blocks run in all."""
    from depthbench.modeling.adapters import adapter_for

    adapter = adapter_for(model)
    removed = {(u.layer, u.part) for u in ModelSurgery(adapter).removed_sub_blocks()}
    attention = [(k, "attention") not in removed for k in range(adapter.num_layers)]
    return attention, 2 * adapter.num_layers - len(removed)


def _attention_width(config) -> int:
    """n_heads x head_dim: the width of the query-key and attention-value products."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def flops_per_token(model, context: float) -> float:
    """Forward FLOPs per token at an average attended ``context`` length: 2 x (weight matmuls of every
    decoder layer, added modules included, + the LM head) + for every layer whose attention runs
    2 x 2 x n_heads x head_dim x context (QK^T and AV; none for a removed attention sub-block).

    Element-wise work (norms, activations, softmax, rotary) is left out: O(d) per token."""
    from depthbench.modeling.adapters import adapter_for

    layers = adapter_for(model).decoder_layers()
    attention_runs, _ = _running_sub_blocks(model)
    width = _attention_width(model.config)
    per_layer = sum(2 * _linear_macs(layer) + (4 * width * context if runs else 0)
                    for layer, runs in zip(layers, attention_runs))
    head = model.get_output_embeddings()
    return float(per_layer + (2 * head.weight.numel() if head is not None else 0))


#: The rule behind ``{kind}_consistent`` (recorded with every speed-up).
LIMIT_RULE = ("a measured speed-up is consistent when its 95% interval meets [1, limit], limit = max(FLOPs ratio, "
              "ratio of attention and MLP sub-blocks that run): a token's time is per-sub-block overhead (kernel "
              "launches, Python; dominant at batch 1 on a CPU or in decode) plus FLOP-proportional work, so the "
              "time ratio lies between the two ratios")


def analytic_speedup(base_model, pruned_model, prompt_len: int, new_tokens: int) -> dict:
    """FLOPs-per-token ratio base / pruned for the prefill (a token of an n-token prompt attends on average
    to (n + 1) / 2 positions) and the decode (steps n+1 .. n+new_tokens attend to n + (new_tokens + 1) / 2),
    the ratio of sub-blocks that run (``sub_blocks``), and each kind's upper ``limit`` (`LIMIT_RULE`)."""
    contexts = {"prefill": (prompt_len + 1) / 2, "decode": prompt_len + (new_tokens + 1) / 2}
    blocks = _running_sub_blocks(base_model)[1] / _running_sub_blocks(pruned_model)[1]
    out: dict = {"flops_per_token": {}, "sub_blocks": blocks}
    for kind, context in contexts.items():
        base, pruned = flops_per_token(base_model, context), flops_per_token(pruned_model, context)
        out[kind] = base / pruned
        out[f"{kind}_limit"] = max(base / pruned, blocks)
        out["flops_per_token"][kind] = {"base": base, "pruned": pruned, "context": context}
    return out

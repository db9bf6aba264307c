"""Efficiency: model size and generation speed, so every result shows what depth pruning buys.

`measure_speed` times a prefill (the prompt in one forward pass, filling the KV cache) and a greedy
decode (one token per step from that cache) on a fixed prompt. Call it on the base model and on the
pruned model in the same process with the same settings; `speedup` then compares the two.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch

from depthbench.errors import ConfigError

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


def measure_speed(model, tokenizer, prompt_len: int = 256, new_tokens: int = 32, batch_size: int = 1,
                  repeats: int = 3) -> dict:
    """Prefill and decode throughput in tokens per second (medians over ``repeats``, after a warm-up).

    prefill tokens/s = batch_size * prompt_len / prefill time;
    decode tokens/s = batch_size * new_tokens / time of the ``new_tokens`` single-token steps.
    """
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("batch_size", batch_size),
                        ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"efficiency.{name}={value!r} is not allowed; use an integer >= 1")
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

"""Token-level perplexity on fixed-length, non-overlapping windows of held-out text.

The held-out documents are concatenated (EOS-separated) and cut into ``seq_len``-token windows; each
window is scored independently and the perplexity is ``exp(total NLL / predicted tokens)``,
accumulated in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from depthbench.calibration.batches import build_batches
from depthbench.errors import ConfigError


def heldout_windows(cfg, tokenizer):
    """The evaluation windows: ``cfg`` is ``evaluation.perplexity`` (source, split, seq_len, ...)."""
    from depthbench.calibration.sources import build_source

    source = build_source(cfg)
    docs = source.render(source.documents(cfg.split), tokenizer)
    if not docs:
        raise ConfigError(f"perplexity source {source.description} ({cfg.split}) has no documents")
    # Documents in their stored order, packed: every run and both models see the same windows.
    return build_batches(docs, tokenizer, int(cfg.max_windows), int(cfg.seq_len), int(cfg.batch_size),
                         seed=None, packing=True, description=f"{source.description} [{cfg.split}]")


@torch.no_grad()
def perplexity(model, batches: list[dict[str, torch.Tensor]], progress: bool = True, desc: str = "perplexity") -> dict:
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        keep = mask[:, 1:].bool() & mask[:, :-1].bool()
        # log-softmax in float32 (float64 logits over a 50k+ vocabulary cost more than the forward);
        # the sum over tokens is accumulated in float64.
        nll = F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="none")
        total_nll += float(nll.to(torch.float64).sum())
        total_tokens += int(keep.sum())
    return perplexity_record(total_nll, total_tokens)


def perplexity_record(total_nll: float, tokens: int) -> dict:
    """``{"perplexity", "nll_per_token", "tokens"}`` from a summed NLL (float64) over ``tokens`` predicted tokens."""
    mean = total_nll / tokens
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": tokens}

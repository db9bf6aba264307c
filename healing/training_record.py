"""What every healing mode records of its training run (the mode adds its own fields beside these)."""

from __future__ import annotations


def training_record(curve: list[float], tokens: int, batches: list[dict], seconds: float) -> dict:
    """Steps, tokens, predicted tokens (next-token targets whose target and context are both real), time and the
    training-loss curve of one healing run."""
    return {
        "steps": len(curve),
        "tokens": tokens,
        "predicted_tokens": sum(int((b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).sum())
                                for b in batches),
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(len(curve), 1), 4),
        "loss_curve": [round(v, 6) for v in curve],
        "loss_first": curve[0],
        "loss_last": curve[-1],
    }

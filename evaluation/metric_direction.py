"""Which way each metric points: the one table that says whether a higher value is better.

Read by the lm-eval runner (a task on a lower-is-better metric is kept out of the accuracy ``tasks``, their
average and the retention), by the leaderboard (its own columns) and by the ranking (``--rank-by``). lm-eval's
headline metrics of the offline suites are accuracies; ``bits_per_byte`` (the gold-solution tasks,
`depthbench.evaluation.gold_bpb`) and the perplexities are losses. The held-out metrics the ranking
compares per window (``kl``, ``nll``, ``top1``) are declared here too.
"""

from __future__ import annotations

HIGHER_IS_BETTER: dict[str, bool] = {
    # lm-eval task metrics
    "acc": True,
    "acc_norm": True,
    "exact_match": True,
    "f1": True,
    "mcc": True,
    "bits_per_byte": False,
    "byte_perplexity": False,
    "word_perplexity": False,
    "perplexity": False,
    # per held-out window (depthbench.evaluation.fidelity), ranked by depthbench.experiments.ranking
    "kl": False,
    "nll": False,
    "top1": True,
}


def higher_is_better(metric: str) -> bool:
    """True for an accuracy-like metric. A metric missing from `HIGHER_IS_BETTER` counts as one: every task result
    written before this table existed was scored that way."""
    return HIGHER_IS_BETTER.get(metric, True)

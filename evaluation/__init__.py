"""Evaluation of base and pruned models: held-out perplexity (lm-eval benchmarks: see later issues)."""

"""Evaluation of base and pruned models: held-out perplexity, lm-eval benchmarks on offline data, fidelity to the
dense model, speed, retention and its intervals."""

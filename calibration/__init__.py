"""Calibration: text sources, tokenised batches, and the activation-statistics pass over them."""

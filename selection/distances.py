"""Distances between residual-stream states, in float64."""

from __future__ import annotations

import math

import torch

from depthbench.calibration.statistics import cosine_rows


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cos(a, b) in float64, clamped to [-1, 1]."""
    return cosine_rows(a, b)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / pi`` row-wise, in [0, 1]."""
    return torch.arccos(cosine_rows(a, b)) / math.pi


def one_minus_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - cosine_rows(a, b)

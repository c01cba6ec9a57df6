"""The two numbers every report gives: top-1 accuracy and the base/novel harmonic mean."""

from __future__ import annotations

import torch


def top1(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Top-1 accuracy (%) of cosine similarity; both sides are already normalised."""
    if len(labels) == 0:
        return float("nan")
    return 100.0 * ((features @ weights.T).argmax(1) == labels).float().mean().item()


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)

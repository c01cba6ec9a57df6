"""The numbers every report gives: top-1 accuracy, the base/novel harmonic mean, and top-k scores
of many features against a large head, computed in chunks so memory stays bounded."""

from __future__ import annotations

import torch


def top_k(features: torch.Tensor, weights: torch.Tensor, k: int = 1, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (similarity, class index) per feature row, `chunk` rows at a time: a million
    features against 21,843 classes never holds the full (N, classes) score matrix."""
    k = min(k, weights.shape[0])
    values = torch.empty(len(features), k)
    indices = torch.empty(len(features), k, dtype=torch.long)
    for start in range(0, len(features), chunk):
        scores = features[start : start + chunk].to(weights.dtype) @ weights.T
        values[start : start + chunk], indices[start : start + chunk] = scores.topk(k, dim=1)
    return values, indices


def top1(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Top-1 accuracy (%) of cosine similarity; both sides are already normalised."""
    return accuracy(hits(features, labels, weights))


def accuracy(right: torch.Tensor) -> float:
    """Top-1 accuracy (%) from per-query hits (`hits`); NaN for no queries."""
    if len(right) == 0:
        return float("nan")
    return 100.0 * int(right.sum()) / len(right)  # exact: 8.0, not 7.999999821 from a float32 mean


def hits(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per feature row, whether its best class is its label: what a paired comparison of two heads
    on the same queries (a bootstrap interval of their difference) needs, which an accuracy hides."""
    return top_k(features, weights)[1][:, 0] == labels


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)

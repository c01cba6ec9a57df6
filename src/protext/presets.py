"""The paper's training settings, by name. Any value can be overridden by a flag or config file.

All presets share: batch 256 pairs, AdamW (weight decay 0.1, betas 0.9/0.98), cosine
schedule, 5 warm-up epochs at a constant 1e-5, MSE x 1000, depth 9.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Train once on ImageNet descriptions, test on other datasets.
    "cross-dataset": dict(n_ctx=4, depth=9, lr=0.03, epochs=10, init="a photo of a"),
    # Domain generalisation and text-only supervised ImageNet: 16 random context vectors.
    "imagenet-200ep": dict(n_ctx=16, depth=9, lr=0.0025, epochs=200, init="random"),
    # Per dataset, base classes only (the official configs range 30-200 epochs; 30 here).
    "base2novel": dict(n_ctx=4, depth=9, lr=0.03, epochs=30, init="a photo of a"),
    # Per dataset, all classes, evaluated on the same label set.
    "text-only": dict(n_ctx=4, depth=9, lr=0.03, epochs=30, init="a photo of a"),
}

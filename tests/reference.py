"""A plain ProText step, written the straightforward way, to check the fast path against.

No target cache (descriptions re-encoded every step), no de-duplication (one input per
pair), every sequence padded to the model's full context length.
"""

from __future__ import annotations

from typing import Sequence

import torch

from protext.model import ProText
from protext.text_encoder import pad
from protext.train import TrainConfig, loss_fn


def plain_loss(model: ProText, class_names: Sequence[str], texts: Sequence[str], cfg: TrainConfig) -> torch.Tensor:
    text = model.backbone.text
    full = text.max_length
    with torch.no_grad():
        targets = text(text.tokenize(texts, length=full).to(text.device))
    inputs = pad(model.class_token_lists(class_names), text.pad_id, length=full)
    return loss_fn(cfg, model(inputs), targets)

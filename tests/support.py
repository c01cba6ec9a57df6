"""What the tests and benchmarks share: where the shared data is, builders of small CoOp
dataset trees with real split files, and the plain ProText step the fast one is checked against.

The plain step is written the straightforward way: no target cache (descriptions
re-encoded every step), no de-duplication (one input per pair), every sequence padded to the
model's full context length.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from protext.training.datasets import SPLIT_DATASETS
from protext.model import ProText
from protext.text_encoder import pad
from protext.training.train import TrainConfig, loss_fn

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CUPL = SHARED / "descriptions" / "cupl"
DCLIP = SHARED / "descriptions" / "dclip"

SPLIT_FILES = {"caltech101": "Caltech101", "dtd": "DescribableTextures", "eurosat": "EuroSAT",
               "oxford_flowers": "OxfordFlowers", "oxford_pets": "OxfordPets", "stanford_cars": "StanfordCars",
               "ucf101": "UCF101"}


def tiny_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), 120, np.uint8)).save(path)


def make_coop_tree(root, name, per_class=2):
    """A CoOp folder for `name`: its real split file cut to `per_class` items per class and split,
    with tiny images at exactly the listed paths."""
    folder, image_dir, split_file = SPLIT_DATASETS[name]
    raw = json.loads((SHARED / "splits" / f"split_zhou_{SPLIT_FILES[name]}.json").read_text())
    cut = {}
    for split, items in raw.items():
        seen = {}
        cut[split] = [it for it in items if seen.setdefault(it[1], []).append(it) or len(seen[it[1]]) <= per_class]
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / split_file).write_text(json.dumps(cut))
    for items in cut.values():
        for rel, _, _ in items:
            tiny_image(root / folder / image_dir / rel)
    return raw, cut



def plain_loss(model: ProText, class_names: Sequence[str], texts: Sequence[str], cfg: TrainConfig) -> torch.Tensor:
    text = model.backbone.text
    full = text.max_length
    with torch.no_grad():
        targets = text(text.tokenize(texts, length=full).to(text.device))
    inputs = pad(model.class_token_lists(class_names), text.pad_id, length=full)
    return loss_fn(cfg, model(inputs), targets)


def quick_gelu(h: torch.Tensor) -> torch.Tensor:
    """CLIP's activation."""
    return h * torch.sigmoid(1.702 * h)


def tanh_gelu(h: torch.Tensor) -> torch.Tensor:
    """SigLIP's activation."""
    return torch.nn.functional.gelu(h, approximate="tanh")


def block_by_hand(layer, x: torch.Tensor, causal: bool, gelu) -> torch.Tensor:
    """One pre-LN transformer block written out: self-attention (causal for CLIP; for SigLIP no mask
    at all, so every position, padding included, sees every other), then the MLP with `gelu`."""
    F = torch.nn.functional
    attn = layer.self_attn
    h = F.layer_norm(x, (x.shape[-1],), layer.layer_norm1.weight, layer.layer_norm1.bias, layer.layer_norm1.eps)
    B, L, D = h.shape
    heads = attn.num_heads
    q = (h @ attn.q_proj.weight.T + attn.q_proj.bias).view(B, L, heads, -1).transpose(1, 2)
    k = (h @ attn.k_proj.weight.T + attn.k_proj.bias).view(B, L, heads, -1).transpose(1, 2)
    v = (h @ attn.v_proj.weight.T + attn.v_proj.bias).view(B, L, heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
    x = x + a @ attn.out_proj.weight.T + attn.out_proj.bias
    h = F.layer_norm(x, (D,), layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps)
    h = gelu(h @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias)
    return x + h @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias

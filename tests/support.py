"""What the tests and benchmarks share: where the shared data is, builders of small CoOp
dataset trees with real split files, and the plain ProText step the fast one is checked against.

The plain step is written the straightforward way: no target cache (descriptions
re-encoded every step), no de-duplication (one input per pair), every sequence padded to the
model's full context length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from protext.datasets import SPLIT_DATASETS
from protext.model import ProText
from protext.text_encoder import pad
from protext.train import TrainConfig, loss_fn

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

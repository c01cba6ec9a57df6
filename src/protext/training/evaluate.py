"""Accuracy of heads on a labelled image dataset, with its image features computed once.

`extract` runs the image job (`engine.run`) over the dataset's images that the feature cache
lacks, in parts, storing each finished part atomically before the next starts: an interrupted
extraction resumes where it stopped. The cache is keyed by the image tower's fingerprint and
each file's path, size and modification time, so new vision weights or a changed file never
reuse old features. Unreadable files (corrupt, truncated, missing, too large) are skipped,
counted and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..backbone import Backbone
from ..cache import sha1
from ..context import Context
from ..engine import run, spans
from ..errors import ProtextError
from ..feature_cache import feature_store
from ..heads import Heads, head_names
from ..hub_datasets import HubImage
from ..images import MAX_PIXELS
from ..metrics import top1
from .datasets import Dataset


@dataclass
class LabelledFeatures:
    """L2-normalised image features with their labels; `skipped` lists (path, reason)."""

    feats: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def image_key(path: Path | HubImage) -> str:
    """Changes when the file does: path, size and modification time (a dataset row: its own key)."""
    if isinstance(path, HubImage):
        return path.key
    try:
        st = path.stat()
        return sha1(str(path.resolve()), str(st.st_size), str(st.st_mtime_ns))
    except OSError:
        return sha1(str(path), "missing")


def extract(backbone: Backbone, dataset: Dataset, ctx: Context = Context(), batch_size: int = 64,
            workers: int | None = None, part_size: int = 512, max_pixels: int = MAX_PIXELS,
            augment: tuple[int, int] | None = None) -> LabelledFeatures:
    """Features of every readable image of `dataset`, from the cache where possible; with `augment`
    (views, seed), each image's (1 + views, dim) view features (`engine.run`), cached apart."""
    if backbone.image is None:
        raise ProtextError(f"backbone '{backbone.name}' has no image tower")
    name = f"{dataset.name}-{dataset.split}" + (f"-views{augment[0]}-seed{augment[1]}" if augment else "")
    images = feature_store(backbone, "image", ctx, name)
    paths = [p for p, _ in dataset.samples]
    keys = [image_key(p) for p in paths]
    todo = images.missing(keys)
    skipped: dict[int, str] = {}
    work = [(i, [todo[k] for k in r]) for i, r in enumerate(spans(len(todo), part_size))]
    with ctx.bar(len(todo), f"image features {dataset.name}", "img", show=bool(todo)) as bar:
        for part in run(backbone, ((i, [paths[j] for j in positions]) for i, positions in work), batch_size, workers,
                        progress=bar.update, max_pixels=max_pixels, augment=augment):
            positions = work[part.index][1]
            good = [k for k, e in enumerate(part.errors) if e is None]
            skipped.update((positions[k], e) for k, e in enumerate(part.errors) if e is not None)
            if good:
                images.put([keys[positions[k]] for k in good], part.features[good].flatten(1))
    kept = [i for i in range(len(paths)) if keys[i] in images]
    labels = torch.tensor([dataset.samples[i][1] for i in kept], dtype=torch.long)
    feats = images.stack([keys[i] for i in kept])
    if augment is not None and len(feats):
        feats = feats.view(len(kept), 1 + augment[0], -1)
    return LabelledFeatures(feats, labels, [str(paths[i]) for i in kept],
                            [(str(paths[i]), reason) for i, reason in sorted(skipped.items())])


def accuracy(features: LabelledFeatures, weights: torch.Tensor) -> float:
    return top1(features.feats, features.labels, weights)


def evaluate(backbone: Backbone, dataset: Dataset, heads: Heads, names: Sequence[str],
             ctx: Context = Context(), max_pixels: int = MAX_PIXELS) -> dict:
    """Top-1 accuracy of each named head on `dataset`, plus counts and skipped files."""
    for name in names:
        head_names(name)  # an unknown head is an error before any image is read
    feats = extract(backbone, dataset, ctx, max_pixels=max_pixels)
    row = {"dataset": dataset.name, "split": dataset.split, "classes": len(dataset.classes),
           "images": len(feats.labels), "skipped": len(feats.skipped), "skipped_files": feats.skipped[:50],
           "notes": dataset.notes}
    for name in names:
        views = heads.views(name)
        if not views:
            row[name] = accuracy(feats, heads.get(name, dataset.classes))
            continue
        seen = extract(backbone, dataset, ctx, max_pixels=max_pixels, augment=(views, heads.inputs.awt.seed))
        scores = heads.logits(name, seen.feats, heads.get(name, dataset.classes), dataset.classes)
        row[name] = 100.0 * int((scores.argmax(1) == seen.labels).sum()) / max(1, len(seen.labels))
    return row

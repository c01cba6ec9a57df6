"""Text and image features of the frozen towers, computed once and reused by every head and run.

Both live in `FeatureStore`s under the cache folder, keyed by one rule (`feature_store`): the
backbone's name and revision and a fingerprint of the tower that made them (for text, also
the text-cleaning rule), so features are never served for other weights.

Text: `encode_texts` encodes only the sentences no earlier run stored (descriptions,
templates, masked queries). Images: `extract`, per (backbone, dataset, split). Decoding
and preprocessing run in threads a bounded window ahead (`images.decode_ahead`; PIL releases
the GIL) while the main thread runs the image tower, so the CPU or GPU is kept busy. Each
finished chunk is stored atomically before the next starts: an interrupted extraction resumes where it
stopped. Unreadable files (corrupt, truncated, missing, too large: see `images.load_pixels`)
are skipped, counted and listed. The cache is keyed by the image tower's own fingerprint,
so new vision weights saved under the same name never reuse old features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .backbone import Backbone
from .cache import FeatureStore, default_cache_dir, sha1
from .datasets import Dataset
from .errors import ProtextError
from .images import decode_ahead


@dataclass
class Features:
    """L2-normalised image features with their labels; `skipped` lists (path, reason)."""

    feats: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def image_key(path: Path) -> str:
    """Changes when the file does: path, size and modification time."""
    try:
        st = path.stat()
        return sha1(str(path.resolve()), str(st.st_size), str(st.st_mtime_ns))
    except OSError:
        return sha1(str(path), "missing")


def feature_store(backbone: Backbone, tower: str, cache_dir: Path | None = None, *parts: str) -> FeatureStore:
    """The store of one tower's features ("text" or "image"), under `cache_dir/<tower>/<backbone>-<key>/<parts>`."""
    fingerprint = (backbone.fingerprint() + backbone.text.text_rule) if tower == "text" else backbone.image.fingerprint()
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in backbone.name)[-60:]
    key = sha1(backbone.name, str(backbone.revision), fingerprint)[:12]
    return FeatureStore(Path(cache_dir or default_cache_dir()).joinpath(tower, f"{slug}-{key}", *parts))


def encode_texts(backbone: Backbone, texts: Sequence[str], cache_dir: Path | None = None,
                 show_progress: bool = True) -> torch.Tensor:
    """Plain (unprompted) features of `texts`, from the on-disk cache where an earlier run stored them."""
    from tqdm.auto import tqdm

    texts_store = feature_store(backbone, "text", cache_dir)
    keys = [sha1(t) for t in texts]
    todo = len({k for k in keys if k not in texts_store})
    bar = tqdm(total=todo, desc="encoding texts", unit="text", disable=not show_progress or todo == 0)
    with bar:
        return texts_store.get(keys, lambda pos: backbone.text.encode([texts[p] for p in pos]), progress=bar.update)


def extract(backbone: Backbone, dataset: Dataset, cache_dir: Path | None = None, batch_size: int = 64,
            workers: int | None = None, chunk: int = 512, show_progress: bool = True) -> Features:
    """Features of every readable image of `dataset`, from the cache where possible."""
    from tqdm.auto import tqdm

    tower = backbone.image
    if tower is None:
        raise ProtextError(f"backbone '{backbone.name}' has no image tower")
    images = feature_store(backbone, "image", cache_dir, f"{dataset.name}-{dataset.split}")
    paths = [p for p, _ in dataset.samples]
    keys = [image_key(p) for p in paths]
    todo = images.missing(keys)
    skipped: dict[int, str] = {}
    workers = workers or min(8, os.cpu_count() or 1)
    with tqdm(total=len(todo), desc=f"image features {dataset.name}", unit="img",
              disable=not show_progress or not todo) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            good, feats, pixels = [], [], []
            decoded = decode_ahead([paths[i] for i in part], tower.image_size, tower.mean, tower.std, workers,
                                   2 * batch_size + workers)
            for j, result in decoded:
                i = part[j]
                if isinstance(result, str):
                    skipped[i] = result
                else:
                    good.append(i)
                    pixels.append(result)
                if len(pixels) == batch_size:
                    feats.append(tower(torch.stack(pixels).to(backbone.device)).cpu())
                    pixels = []
                bar.update(1)
            if pixels:
                feats.append(tower(torch.stack(pixels).to(backbone.device)).cpu())
            if good:
                images.put([keys[i] for i in good], torch.cat(feats))
    kept = [i for i in range(len(paths)) if keys[i] in images]
    labels = torch.tensor([dataset.samples[i][1] for i in kept], dtype=torch.long)
    return Features(images.stack([keys[i] for i in kept]), labels, [str(paths[i]) for i in kept],
                    [(str(paths[i]), reason) for i, reason in sorted(skipped.items())])

"""The feature cache: plain features of the frozen towers, computed once and reused by every head and run.

Features live in `FeatureStore`s under the cache folder, keyed by one rule (`feature_store`): the
backbone's name and revision and a fingerprint of the tower that made them (for text, also
the text-cleaning rule), so features are never served for other weights. `encode_texts`
encodes only the sentences no earlier run stored (descriptions, templates, masked queries);
image features of labelled datasets are cached the same way (`training.evaluate.extract`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .backbone import Backbone
from .cache import FeatureStore, sha1
from .context import Context


def feature_store(backbone: Backbone, tower: str, ctx: Context = Context(), *parts: str) -> FeatureStore:
    """The store of one tower's features ("text" or "image"), under `<cache>/<tower>/<backbone>-<key>/<parts>`."""
    fingerprint = (backbone.fingerprint() + backbone.text.text_rule) if tower == "text" else backbone.image.fingerprint()
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in backbone.name)[-60:]
    key = sha1(backbone.name, str(backbone.revision), fingerprint)[:12]
    return FeatureStore(Path(ctx.cache).joinpath(tower, f"{slug}-{key}", *parts))


def encode_texts(backbone: Backbone, texts: Sequence[str], ctx: Context = Context(), show: bool = True) -> torch.Tensor:
    """Plain (unprompted) features of `texts`, from the on-disk cache where an earlier run stored them."""
    texts_store = feature_store(backbone, "text", ctx)
    keys = [sha1(t) for t in texts]
    todo = len({k for k in keys if k not in texts_store})
    with ctx.bar(todo, "encoding texts", "text", show=show and todo > 0) as bar:
        return texts_store.get(keys, lambda pos: backbone.text.encode([texts[p] for p in pos]), progress=bar.update)

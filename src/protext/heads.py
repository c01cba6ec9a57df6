"""Zero-shot heads: one (classes, dim) matrix of normalised class embeddings per label set.

Every head is a small declaration in `HEADS`, built by one builder (`Heads.get`):

- a `TextHead` gives each class some sentences (one template, many templates, or the
  class's own descriptions); the class embedding is the mean of their normalised plain
  features, renormalised. A class the head has no sentences for falls back to another head.
- a `PromptHead` encodes each class name through the learned prompts.
- heads joined with `+` ("protext+cupl") are the renormalised mean of their embeddings.

The heads:

- `clip`:    one template per dataset ("a photo of a {}.", "{} texture.", ...);
- `clip80`:  CLIP's 80 ImageNet templates;
- `cupl`:    the class's LLM descriptions (classes without any fall back to `clip`, as in
             the paper);
- `protext`: the learned prompts with "a photo of a {}.", or, for prompts learned on
             another dataset (cross-dataset), that dataset's inference template
             ("a photo of a {}, a type of pet."), as ProText's code does.

Plain text features come from the on-disk feature store, so a sentence seen in any earlier
run is not encoded again; built heads are memoised per (head, label set, dataset).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .backbone import Backbone
from .descriptions import normalize_name
from .errors import ProtextError
from .features import encode_texts
from .model import ProText
from .templates import IMAGENET_80, clip_template, protext_template


def ensemble(features: torch.Tensor) -> torch.Tensor:
    """One class embedding from several: the renormalised mean of normalised features (CuPL, CLIP-80)."""
    return F.normalize(features.mean(0), dim=-1)


@dataclass(frozen=True)
class TextHead:
    """Each class is the ensemble of its sentences' plain features.

    `sentences(heads, dataset, name)` returns the class's sentences, or None when the head has
    none for it: that class then takes the `fallback` head's embedding.
    """

    sentences: Callable[["Heads", str | None, str], Sequence[str] | None]
    fallback: str | None = None


@dataclass(frozen=True)
class PromptHead:
    """Each class is its name through the learned prompts, with ProText's inference template."""


HEADS: dict[str, TextHead | PromptHead] = {
    "clip": TextHead(lambda heads, dataset, name: [clip_template(dataset).format(name)]),
    "clip80": TextHead(lambda heads, dataset, name: [t.format(name) for t in IMAGENET_80]),
    "cupl": TextHead(lambda heads, dataset, name: heads.descriptions.get(normalize_name(name)), fallback="clip"),
    "protext": PromptHead(),
}


def head_names(spec: str) -> list[str]:
    """The heads a name stands for ("protext+cupl" -> both), each checked to exist."""
    parts = [p.strip() for p in spec.split("+")]
    for p in parts:
        if p not in HEADS:
            raise ProtextError(f"unknown head {p!r}; choose from {', '.join(HEADS)}, or join them with '+'")
    return parts


def default_heads(has_prompts: bool, has_descriptions: bool) -> list[str]:
    """What to evaluate when no head is named: clip, then cupl with descriptions, then protext
    with prompts; the last is what a classifier uses."""
    return ["clip"] + (["cupl"] if has_descriptions else []) + (["protext"] if has_prompts else [])


class Heads:
    """Builds and memoises class-embedding matrices for one backbone.

    `fallbacks[(head, classes, dataset)]` lists the classes a text head had no sentences for.
    """

    def __init__(self, backbone: Backbone, prompts: ProText | None = None,
                 descriptions: Mapping[str, Sequence[str]] | None = None, cache_dir: Path | None = None,
                 cross_dataset: bool = False):
        self.backbone, self.prompts, self.cache_dir = backbone, prompts, cache_dir
        self.cross_dataset = cross_dataset
        self.descriptions = {normalize_name(k): list(v) for k, v in (descriptions or {}).items()}
        self._memo: dict[tuple, torch.Tensor] = {}
        self.fallbacks: dict[tuple, list[str]] = {}

    def fallback_notes(self) -> list[str]:
        """One line per built head that gave some classes another head's embedding."""
        notes = []
        for (head, classes, _), missing in self.fallbacks.items():
            if missing:
                shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                notes.append(f"{head} head: no sentences for {len(missing)} of {len(classes)} classes, which use the "
                             f"{HEADS[head].fallback} head instead: {shown}")
        return notes

    def get(self, head: str, classes: Sequence[str], dataset: str | None = None) -> torch.Tensor:
        key = (head, tuple(classes), dataset)
        if key not in self._memo:
            parts = head_names(head)
            if len(parts) > 1:
                self._memo[key] = F.normalize(sum(self.get(p, classes, dataset) for p in parts), dim=-1)
            else:
                self._memo[key] = self._build(head, list(classes), dataset)
        return self._memo[key]

    def _build(self, head: str, classes: list[str], dataset: str | None) -> torch.Tensor:
        spec = HEADS[head]
        if isinstance(spec, PromptHead):
            if self.prompts is None:
                raise ProtextError(f"head '{head}' needs learned prompts (--prompts DIR)")
            return self.prompts.encode_classes(classes, protext_template(dataset, self.cross_dataset))
        sentences = {c: spec.sentences(self, dataset, c) for c in classes}
        have = [c for c in classes if sentences[c]]
        missing = [c for c in classes if not sentences[c]]
        if missing and spec.fallback is None:
            raise ProtextError(f"head '{head}' has no sentences for {', '.join(missing[:5])}")
        self.fallbacks[(head, tuple(classes), dataset)] = missing
        flat = [s for c in have for s in sentences[c]]
        feats = encode_texts(self.backbone, flat, self.cache_dir, show_progress=len(flat) > 5000)
        rows: dict[str, torch.Tensor] = {}
        start = 0
        for c in have:
            rows[c] = ensemble(feats[start : start + len(sentences[c])])
            start += len(sentences[c])
        if missing:
            rows.update(zip(missing, self.get(spec.fallback, missing, dataset)))
        return torch.stack([rows[c] for c in classes])

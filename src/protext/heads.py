"""Zero-shot heads: one (classes, dim) matrix of normalised class embeddings per label set.

Every head is a small declaration in `HEADS`, built by one builder (`Heads.get`):

- a `TextHead` gives each class some sentences (one template, many templates, the class's
  own descriptions, or descriptor sentences); the class embedding is the mean of their
  normalised plain features, renormalised (CuPL, CLIP-80) or not (DCLIP, WaffleCLIP: then a
  class's score is the mean of its per-sentence cosine similarities). A class the head has
  no sentences for falls back to another head, or is an error where the head has none.
- a `PromptHead` encodes each class name through the learned prompts.
- heads joined with `+` ("protext+cupl") are the renormalised mean of their embeddings.

The heads:

- `clip`:    one template per dataset ("a photo of a {}.", "{} texture.", ...);
- `clip80`:  CLIP's 80 ImageNet templates;
- `cupl`:    the class's LLM descriptions (classes without any fall back to `clip`, as in
             the paper);
- `dclip`:   the class's DCLIP descriptors as "{class}, which has {descriptor}" (`descriptors=`),
             scored by the mean of per-descriptor similarities;
- `waffle`:  WaffleCLIP's shared random word and character descriptors, seeded (`waffle=`);
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
from .baselines import characters_of, dclip_sentence, waffle_descriptors, waffle_prefix, word_vocabulary
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
    """Each class is the mean of its sentences' normalised plain features, renormalised or not.

    `sentences(heads, dataset, classes, name)` returns the class's sentences, or None when the
    head has none for it: that class then takes the `fallback` head's embedding, or, without a
    fallback, is an error that says what `needs` to be given.
    """

    sentences: Callable[["Heads", str | None, Sequence[str], str], Sequence[str] | None]
    fallback: str | None = None
    renormalize: bool = True
    needs: str = ""


@dataclass(frozen=True)
class Waffle:
    """WaffleCLIP's settings: pairs of random descriptors, their seed, an optional high-level concept."""

    count: int = 15
    seed: int = 0
    concept: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ProtextError(f"--waffle-count must be at least 1, got {self.count!r}")


@dataclass(frozen=True)
class PromptHead:
    """Each class is its name through the learned prompts, with ProText's inference template."""


def _dclip(heads: "Heads", dataset: str | None, classes: Sequence[str], name: str) -> list[str] | None:
    descriptors = heads.descriptors.get(normalize_name(name))
    after = "." if dataset and dataset.startswith("imagenet") else ""  # DCLIP ends its sentences so on ImageNet only
    return None if descriptors is None else [dclip_sentence(name, d, after=after) for d in descriptors]


def _waffle(heads: "Heads", dataset: str | None, classes: Sequence[str], name: str) -> list[str]:
    prefix = waffle_prefix(heads.waffle.concept)
    return [f"{prefix}{dclip_sentence(name, d)}." for d in heads.waffle_descriptors(classes)]


HEADS: dict[str, TextHead | PromptHead] = {
    "clip": TextHead(lambda heads, dataset, classes, name: [clip_template(dataset).format(name)]),
    "clip80": TextHead(lambda heads, dataset, classes, name: [t.format(name) for t in IMAGENET_80]),
    "cupl": TextHead(lambda heads, dataset, classes, name: heads.descriptions.get(normalize_name(name)),
                     fallback="clip"),
    "dclip": TextHead(_dclip, renormalize=False, needs="DCLIP descriptors (--descriptors FILE or dclip:NAME)"),
    "waffle": TextHead(_waffle, renormalize=False),
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


def choose_heads(spec: str | None, has_prompts: bool, has_descriptions: bool, has_descriptors: bool) -> list[str]:
    """The heads a comma-separated `spec` names, each checked; "all" is every head the data allows, None the default."""
    if spec is None:
        return default_heads(has_prompts, has_descriptions)
    if spec.strip() == "all":
        needs = {"cupl": has_descriptions, "dclip": has_descriptors, "protext": has_prompts}
        return [h for h in HEADS if needs.get(h, True)] + (["protext+cupl"] if has_prompts and has_descriptions else [])
    names = [h.strip() for h in spec.split(",") if h.strip()]
    for name in names:
        head_names(name)
    return names


class Heads:
    """Builds and memoises class-embedding matrices for one backbone.

    `fallbacks[(head, classes, dataset)]` lists the classes a text head had no sentences for.
    """

    def __init__(self, backbone: Backbone, prompts: ProText | None = None,
                 descriptions: Mapping[str, Sequence[str]] | None = None, cache_dir: Path | None = None,
                 cross_dataset: bool = False, descriptors: Mapping[str, Sequence[str]] | None = None,
                 waffle: Waffle = Waffle()):
        self.backbone, self.prompts, self.cache_dir = backbone, prompts, cache_dir
        self.cross_dataset, self.waffle = cross_dataset, waffle
        self.descriptions = {normalize_name(k): list(v) for k, v in (descriptions or {}).items()}
        self.descriptors = {normalize_name(k): list(v) for k, v in (descriptors or {}).items()}
        self._memo: dict[tuple, torch.Tensor] = {}
        self._waffle_memo: dict[tuple, list[str]] = {}
        self.fallbacks: dict[tuple, list[str]] = {}

    def waffle_descriptors(self, classes: Sequence[str]) -> list[str]:
        """The random descriptors every class of this label set shares (WaffleCLIP).

        Words come from the backbone's own vocabulary; characters from the descriptors or
        descriptions given, as WaffleCLIP draws them from its descriptor files, else from those words.
        """
        key = tuple(classes)
        if key not in self._waffle_memo:  # the head asks once per class; the tokenizer's vocabulary is large
            vocabulary = word_vocabulary(self.backbone.text.tokenizer)
            source = [s for v in (self.descriptors or self.descriptions).values() for s in v] or vocabulary
            self._waffle_memo[key] = waffle_descriptors(classes, vocabulary, characters_of(source), self.waffle.count,
                                                        self.waffle.seed)
        return self._waffle_memo[key]

    def sentences_of(self, head: str, classes: Sequence[str], dataset: str | None = None) -> list[str]:
        """Every sentence a text head encodes for `classes` (none for the prompt head)."""
        spec = HEADS[head]
        if isinstance(spec, PromptHead):
            return []
        return [s for c in classes for s in (spec.sentences(self, dataset, classes, c) or [])]

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
        sentences = {c: spec.sentences(self, dataset, classes, c) for c in classes}
        have = [c for c in classes if sentences[c]]
        missing = [c for c in classes if not sentences[c]]
        if missing and spec.fallback is None:
            shown = ", ".join(repr(c) for c in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ProtextError(f"head '{head}' needs {spec.needs or 'sentences'} for every class; none for {shown}")
        self.fallbacks[(head, tuple(classes), dataset)] = missing
        flat = [s for c in have for s in sentences[c]]
        feats = encode_texts(self.backbone, flat, self.cache_dir, show_progress=len(flat) > 5000)
        rows: dict[str, torch.Tensor] = {}
        start = 0
        for c in have:
            part = feats[start : start + len(sentences[c])]
            rows[c] = ensemble(part) if spec.renormalize else part.mean(0)
            start += len(sentences[c])
        if missing:
            rows.update(zip(missing, self.get(spec.fallback, missing, dataset)))
        return torch.stack([rows[c] for c in classes])

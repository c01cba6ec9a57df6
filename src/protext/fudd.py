"""FuDD (Esfandiarpoor & Bach, ICLR 2024): a second look at the classes an image is confused between,
with LLM descriptions of how exactly those classes differ.

- First pass: one template per class, "A photo of a {name}." (FuDD capitalises it as Python's
  `str.capitalize` does, which also lower-cases the rest), cosine with the image; its top `k`
  classes (10) are the ambiguous set.
- Second pass, for each image: every pair of classes in its ambiguous set brings the captions that
  contrast one with the other (`describe --differential` asks an LLM for them; a pair without any
  brings each class's first-pass template). A class's embedding is the renormalised mean of its
  distinct captions' features, so it depends on which other classes it is confused with here.
  Only the ambiguous classes are scored again; the others cannot be chosen (logit -inf).

Differential descriptions are `{class: {other class: [caption, ...]}}`: the captions of `class`
as opposed to `other class` (a file may list a pair from either side).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .descriptions import normalize_name

TOP_K = 10


def first_pass_text(name: str) -> str:
    return f"a photo of a {name.replace('_', ' ')}.".capitalize()


def pair_captions(differential: Mapping[str, Mapping[str, Sequence[str]]], a: str, b: str) -> list[str] | None:
    """The captions of class `a` as opposed to class `b` (normalised names), or None when the pair was
    never described."""
    found = differential.get(a, {}).get(b)
    return None if found is None else [c.capitalize() for c in found]


def texts_of(differential: Mapping[str, Mapping[str, Sequence[str]]], classes: Sequence[str]) -> list[str]:
    """Every caption the second pass may read for `classes`, and their first-pass texts."""
    keys = [normalize_name(c) for c in classes]
    wanted = set(keys)
    out = [first_pass_text(c) for c in classes]
    for a in keys:
        for b, captions in differential.get(a, {}).items():
            if b in wanted:
                out += [c.capitalize() for c in captions]
    return list(dict.fromkeys(out))


def logits(features: torch.Tensor, first: torch.Tensor, classes: Sequence[str],
           differential: Mapping[str, Mapping[str, Sequence[str]]], feature_of: Mapping[str, torch.Tensor],
           scale: float, bias: float | None, top_k: int = TOP_K) -> torch.Tensor:
    """FuDD's logits (N, C): scale · cosine with the second-pass embedding for each image's top-k
    classes by the first pass (`first`, (C, d)), -inf for the others."""
    k = min(top_k, len(classes))
    out = torch.full((len(features), len(classes)), float("-inf"))
    for n, image in enumerate(features):
        ambiguous = ambiguous_set(image, first, k)
        rows = [F.normalize(torch.stack([feature_of[t] for t in second_pass_texts(differential, classes, ambiguous, a)])
                            .mean(0), dim=-1) for a in ambiguous]
        out[n, ambiguous] = scale * (torch.stack(rows) @ image) + (bias or 0.0)
    return out


def ambiguous_set(image: torch.Tensor, first: torch.Tensor, top_k: int = TOP_K) -> list[int]:
    """The classes (indices) the first pass finds likeliest for one image, likeliest first."""
    return (image @ first.T).topk(min(top_k, len(first))).indices.tolist()


def second_pass_texts(differential: Mapping[str, Mapping[str, Sequence[str]]], classes: Sequence[str],
                      ambiguous: Sequence[int], a: int) -> list[str]:
    """Class `a`'s captions in the second pass: those contrasting it with each other ambiguous class
    (its first-pass text for a pair never described), each once."""
    texts: list[str] = []
    for b in ambiguous:
        if b != a:
            found = pair_captions(differential, normalize_name(classes[a]), normalize_name(classes[b]))
            texts += found if found is not None else [first_pass_text(classes[a])]
    return list(dict.fromkeys(texts)) or [first_pass_text(classes[a])]


def symmetric(raw: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, dict[str, list[str]]]:
    """A differential file read with normalised class names (keys of both levels)."""
    return {normalize_name(a): {normalize_name(b): list(v) for b, v in others.items()} for a, others in raw.items()}

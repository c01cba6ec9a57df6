"""The text of the DCLIP and WaffleCLIP heads, by those methods' own rules.

DCLIP (Menon & Vondrick, ICLR 2023) turns each LLM descriptor of a class ("has a long
neck") into "{class}, which has a long neck", with its own rule for the linking words, and
scores a class by the mean of the per-descriptor cosine similarities.

WaffleCLIP (Roth et al., ICCV 2023) gives every class the same `count` pairs of random
descriptors, one of random words and one of random characters, sized from the label set's
class names: "A photo of a {class}, which has {random words}.". An optional high-level
concept goes in front: "A photo of a {concept}: a {class}, which ...".

Both are plain functions of their inputs and a seed, so a head is reproducible.
"""

from __future__ import annotations

import math
import random
from statistics import mean
from typing import Iterable, Sequence


def dclip_clause(descriptor: str) -> str:
    """DCLIP's linking words, its rule exactly (it tests the first letters, so "antennae" gets "is")."""
    if descriptor.startswith("a") or descriptor.startswith("an"):
        return f"which is {descriptor}"
    if descriptor.startswith(("has", "often", "typically", "may", "can")):
        return f"which {descriptor}"
    if descriptor.startswith("used"):
        return f"which is {descriptor}"
    return f"which has {descriptor}"


def dclip_sentence(name: str, descriptor: str, before: str = "", after: str = "") -> str:
    """"{before}{class}, which ... {descriptor}{after}": DCLIP uses no prefix and, on ImageNet only, a full stop."""
    return f"{before}{name}, {dclip_clause(descriptor)}{after}"


def word_vocabulary(tokenizer) -> list[str]:
    """Whole words of a tokenizer's own vocabulary (which ships as text with every model), sorted.

    WaffleCLIP draws random words from an English word list; a model's vocabulary gives the
    same kind of words without any extra download. A vocabulary that marks word ends (CLIP's
    "</w>") gives only the tokens that end a word: the others are pieces of longer words
    ("aband", "albat"). Word-start markers (GPT's "Ġ", SentencePiece's "▁") are stripped;
    WordPiece continuations ("##ing") are not words.
    """
    vocab = tokenizer.get_vocab()
    ends_marked = any(token.endswith("</w>") for token in vocab)
    words = set()
    for token in vocab:
        if token.startswith("##") or (ends_marked and not token.endswith("</w>")):
            continue
        word = token.removesuffix("</w>").lstrip("Ġ▁")
        if len(word) >= 3 and word.isascii() and word.isalpha() and word.islower():
            words.add(word)
    return sorted(words)


def characters_of(texts: Iterable[str]) -> list[str]:
    """The characters WaffleCLIP draws from: those of the given words, without spaces, commas and full stops."""
    return sorted(set("".join(texts)) - set(" \t\n,."))


def waffle_descriptors(names: Sequence[str], vocabulary: Sequence[str], characters: Sequence[str], count: int = 15,
                       seed: int = 0) -> list[str]:
    """`count` pairs of (random words, random characters), shared by every class of `names`.

    Sizes follow WaffleCLIP: as many words as the class names have on average (at least one),
    each cut to the names' mean word length; the character string has one group more than the
    names' mean number of spaces, with about the names' longest-word length in characters,
    groups joined by ", ".
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    words = [n.replace("_", " ") for n in names]
    n_words = max(round(mean(len(w.split(" ")) for w in words)), 1)
    word_length = round(mean(mean(len(p) for p in w.split(" ")) for w in words))
    pool = [v[:word_length] for v in vocabulary]
    groups = round(mean(w.count(" ") for w in words)) + 1
    n_chars = math.ceil(mean(max(len(p) for p in w.split(" ")) for w in words))
    n_chars += groups - n_chars % groups
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        out.append(" ".join(rng.choice(pool) for _ in range(n_words)))
        out.append(", ".join("".join(rng.choice(characters) for _ in range(n_chars // groups)) for _ in range(groups)))
    return out


def waffle_prefix(concept: str | None) -> str:
    """WaffleCLIP's text before the class name, with the optional high-level concept."""
    return f"A photo of a {concept}: a " if concept else "A photo of a "

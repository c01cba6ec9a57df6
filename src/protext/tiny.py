"""Randomly initialised CLIPs built from a config, with a tokenizer made on the spot.

They need no download, so tests and benchmarks run anywhere. The tokenizer is CLIP's own
byte-level BPE class with a small vocabulary: every byte, plus whole-word tokens for the
words given, so that "a photo of a" is four tokens as it is in real CLIP.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from .backbone import Backbone, from_model

TEMPLATE_WORDS = ("a", "photo", "of", "the", "x", "type", "pet", "flower", "food", "aircraft", "texture", "centered", "satellite")


def _byte_chars() -> list[str]:
    # CLIP's byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def clip_tokenizer(words: Iterable[str] = TEMPLATE_WORDS, max_vocab: int | None = None):
    """A CLIP BPE tokenizer whose vocabulary holds every byte and the given (lower-case) words."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in _byte_chars():
        vocab[c] = len(vocab)
    for c in _byte_chars():
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if not re.fullmatch(r"[a-z0-9]+", word) or len(word) < 2:
            continue
        if max_vocab is not None and len(vocab) >= max_vocab - 2:
            break
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def clip_config(width: int = 32, layers: int = 2, heads: int = 2, vocab_size: int = 49408, context: int = 77,
                vision_width: int = 32, vision_layers: int = 2, vision_heads: int | None = None, image_size: int = 32,
                patch: int = 8, projection: int = 24):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, vocab_size=vocab_size, max_position_embeddings=context,
                         eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                           num_attention_heads=vision_heads or heads, image_size=image_size, patch_size=patch),
        projection_dim=projection,
    )


def _build(seed: int, words: Iterable[str], config: dict):
    from transformers import CLIPModel

    tok = clip_tokenizer(words)
    config.setdefault("vocab_size", len(tok))
    cfg = clip_config(**config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return CLIPModel(cfg), tok


def tiny_clip(seed: int = 0, words: Iterable[str] = TEMPLATE_WORDS, **config) -> Backbone:
    """A tiny random CLIP (text width 32, 2 layers by default) as a Backbone."""
    model, tok = _build(seed, words, config)
    return from_model(model, tok, name=f"tiny-clip-{seed}")


def save_tiny_clip(folder: Path, seed: int = 0, words: Iterable[str] = TEMPLATE_WORDS, **config) -> Path:
    """Write a tiny random CLIP and its tokenizer to `folder`, loadable by `load_backbone(folder)`."""
    model, tok = _build(seed, words, config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

"""Randomly initialised CLIPs and SigLIPs built from a config, with a tokenizer made on the spot.

They need no download, so tests and benchmarks run anywhere. Each tokenizer has a small
vocabulary with whole-word tokens for the words given, so that "a photo of a" is four tokens
as it is in the real models, and follows its model's rules:

- CLIP: CLIP's own byte-level BPE class, every byte plus the words; start and end tokens.
- SigLIP: a SentencePiece-style unigram tokenizer ("▁word" pieces and single characters, as
  SigLIP's SentencePiece model), EOS appended and used as padding, no start token, 64 tokens.
  (`transformers`' SiglipTokenizer itself needs the sentencepiece package and a trained model
  file; the fast tokenizer gives the same kind of ids without either.)
- SigLIP 2: `transformers`' Siglip2Tokenizer (Gemma's BPE with byte fallback) over the words:
  <pad> 0, <eos> 1, <bos> 2 as in Gemma, EOS appended, no BOS, padded on the right.
"""

from __future__ import annotations

import re
import string
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


def _words(words: Iterable[str]) -> list[str]:
    """The distinct lower-case words of `words` that get a token of their own."""
    return [w for w in dict.fromkeys(w.lower() for w in words) if re.fullmatch(r"[a-z0-9]+", w)]


def siglip_tokenizer(words: Iterable[str] = TEMPLATE_WORDS):
    """A SigLIP-style tokenizer: unigram pieces "▁word" for the words and every lower-case letter and
    digit (text reaches it lower-cased and without punctuation), <pad> 0, </s> 1, <unk> 2 as in
    SigLIP's vocabulary; "</s>" appended to every text and used as padding; 64 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    pieces.update({"▁" + w: -1.0 for w in _words(words)})
    pieces.update({"▁": -4.0, **{c: -5.0 for c in string.ascii_lowercase + string.digits}})
    backend = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>",
                                   model_max_length=64)


def gemma_tokenizer(words: Iterable[str] = TEMPLATE_WORDS):
    """A SigLIP 2 tokenizer (Gemma's BPE, `transformers`' Siglip2Tokenizer) whose vocabulary holds the
    special tokens at Gemma's ids, the 256 byte-fallback tokens, single characters and "word" and
    "▁word" for each word; EOS appended, no BOS, padded on the right, 64 tokens, as google/siglip2-*."""
    from transformers import Siglip2Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for c in "▁" + string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []

    def merge(left: str, right: str) -> str:
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
        return left + right

    for word in _words(words):
        left = word[0]
        for char in word[1:]:
            left = merge(left, char)
        merge("▁", word)
    return Siglip2Tokenizer(vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=True,
                            padding_side="right", model_max_length=64)


# variant: (transformers config and model class, tokenizer builder, the tokenizer's pad, eos and bos ids)
SIGLIP_VARIANTS = {
    "siglip": ("SiglipConfig", "SiglipModel", siglip_tokenizer, (1, 1, None)),
    "siglip2": ("SiglipConfig", "SiglipModel", gemma_tokenizer, (0, 1, 2)),  # fixed resolution, as google/siglip2-*-224
    "siglip2-naflex": ("Siglip2Config", "Siglip2Model", gemma_tokenizer, (0, 1, 2)),  # as google/siglip2-*-naflex
}


def siglip_config(variant: str = "siglip", width: int = 32, layers: int = 2, heads: int = 2, vocab_size: int = 32000,
                  context: int = 64, vision_width: int = 32, vision_layers: int = 2, vision_heads: int | None = None,
                  image_size: int = 32, patch: int = 8):
    """A SigLIP (or SigLIP 2) config; NaFlex's position grid has (image_size / patch)² patches."""
    import transformers

    config_class, _, _, (pad, eos, bos) = SIGLIP_VARIANTS[variant]
    vision = dict(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads or heads, patch_size=patch)
    if variant == "siglip2-naflex":
        vision["num_patches"] = (image_size // patch) ** 2
    else:
        vision["image_size"] = image_size
    return getattr(transformers, config_class)(
        text_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, vocab_size=vocab_size, max_position_embeddings=context,
                         pad_token_id=pad, eos_token_id=eos, bos_token_id=bos),
        vision_config=vision,
    )


def _build_siglip(seed: int, variant: str, words: Iterable[str], config: dict):
    import transformers

    if variant not in SIGLIP_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(SIGLIP_VARIANTS)}, got {variant!r}")
    _, model_class, make_tokenizer, _ = SIGLIP_VARIANTS[variant]
    tok = make_tokenizer(words)
    config.setdefault("vocab_size", len(tok))
    cfg = siglip_config(variant, **config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(cfg), tok


def tiny_siglip(seed: int = 0, variant: str = "siglip", words: Iterable[str] = TEMPLATE_WORDS, **config) -> Backbone:
    """A tiny random SigLIP, SigLIP 2 or SigLIP 2 NaFlex (`SIGLIP_VARIANTS`) as a Backbone."""
    model, tok = _build_siglip(seed, variant, words, config)
    return from_model(model, tok, name=f"tiny-{variant}-{seed}")


def save_tiny_siglip(folder: Path, seed: int = 0, variant: str = "siglip", words: Iterable[str] = TEMPLATE_WORDS,
                     **config) -> Path:
    """Write a tiny random SigLIP variant and its tokenizer to `folder`, loadable by `load_backbone(folder)`."""
    model, tok = _build_siglip(seed, variant, words, config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

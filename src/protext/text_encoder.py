"""A frozen text tower that accepts deep prompts.

This is the whole model ProText trains through. A prompted forward pass is:

    x = token_embedding(ids)                    # [SOT] ctx_1..ctx_n name tokens . [EOT]
    x[:, s:s+n] = prompts[0]                    # layer-0 context replaces "a photo of a"
    x = add_positions(x)
    for i, block in enumerate(blocks):
        if 1 <= i < depth: x[:, s:s+n] = prompts[i]   # deep prompts replace hidden states
        x = block(x)
    feature = normalize(pool(x))                # CLIP: LN at EOT, projection; BERT: mean

`s` (`prompt_start`) is where the tokenizer puts the first word of the text: 1 after CLIP's
start token or BERT's [CLS], 0 for SigLIP, which has no start token.

Three towers share that loop and differ in three places (positions, attention mask, pooling):
`ClipText` (causal mask, EOT pooling, projection), `BertText` (padding mask, mean pooling,
as sentence-transformers encoders such as all-MiniLM-L6-v2 are used) and `SiglipText` /
`Siglip2Text` (no mask at all, the last position of a fixed 64-token input, head). The
weights are the `transformers` modules themselves; nothing is copied.

Because CLIP's mask is causal and it pools at EOT, tokens after EOT cannot change the
feature: a batch may be cut to its longest sequence with no change in the result. BERT's
padding mask gives the same guarantee. SigLIP gives none: it was trained on text padded to
64 tokens with attention over the padding and pools the last position, so its batches are
always padded to the full 64 (`cuts_padding`).

Text is cleaned as each model's own tokenizer pipeline cleaned it in training before
`transformers`' tokenizer sees it. CLIP: as OpenAI's tokenizer (`clip_clean`); the
`transformers` one only applies NFC, collapses whitespace and lowers case, so curly quotes
and HTML entities would otherwise become other tokens. SigLIP: lower case, punctuation
removed, whitespace collapsed (`siglip_clean`, as `SiglipTokenizer` does). SigLIP 2: lower
case (its Gemma tokenizer on the Hub does not lower-case by itself).
"""

from __future__ import annotations

import html
import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

import ftfy
import torch
import torch.nn.functional as F
from torch import nn

_WHITESPACE = re.compile(r"\s+")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clip_clean(text: str) -> str:
    """`text` as OpenAI CLIP's simple_tokenizer.py hands it to BPE: ftfy.fix_text, HTML unescaped
    twice, whitespace collapsed, lower case.

    The model was trained on these tokens: ftfy turns "world’s" into "world's" (the `'s`
    token) and "&amp;" becomes "&". It is idempotent (text with entities escaped three times
    aside), and the NFC, whitespace and case rules `transformers`' normalizer applies afterwards
    leave its output as it is.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text).strip().lower()


def siglip_clean(text: str) -> str:
    """`text` as `SiglipTokenizer.canonicalize_text` hands it to SentencePiece: lower case, ASCII
    punctuation removed, whitespace collapsed (big_vision's rule for SigLIP's prompts).

    Done here too, so that a SigLIP tokenizer saved without that step (a fast tokenizer, the
    tiny test ones) gives the same tokens; the rule is idempotent, so doing it twice is harmless.
    """
    return _WHITESPACE.sub(" ", text.lower().translate(_NO_PUNCTUATION)).strip()


@dataclass
class Tokens:
    """Token ids of a batch, padded to its longest sequence (SigLIP: to its fixed length), and each
    sequence's real length."""

    ids: torch.Tensor  # (B, L) long
    lengths: torch.Tensor  # (B,) long

    def to(self, device: torch.device | str) -> "Tokens":
        return Tokens(self.ids.to(device), self.lengths.to(device))


def pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> Tokens:
    """Stack token lists, padded to `length` (default: the longest one)."""
    longest = max(len(s) for s in sequences)
    length = longest if length is None else max(length, longest)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return Tokens(ids, torch.tensor([len(s) for s in sequences], dtype=torch.long))


class TextTower(nn.Module):
    """Shared prompted forward; subclasses say how positions, masks and pooling work."""

    kind: str

    def __init__(self, tokenizer, token_embedding: nn.Embedding, blocks: nn.ModuleList, max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.token_embedding = token_embedding
        self.blocks = blocks
        self.max_length = max_length
        self.prompt_start = _text_start(tokenizer)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    # -- tokenization ------------------------------------------------------------------
    # Names the text-cleaning rule; cached features are keyed by it, so a change of rule
    # never serves features of text that was tokenized another way.
    text_rule = "plain"

    def clean(self, text: str) -> str:
        """Text as the tokenizer should see it; unchanged unless the model was trained on cleaned text."""
        return text

    def token_lists(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, cut at the model's context length."""
        out = self.tokenizer([self.clean(t) for t in texts], truncation=True, max_length=self.max_length, padding=False)
        return [list(ids) for ids in out["input_ids"]]

    # Whether a batch may be cut to its longest sequence with no change in any feature.
    cuts_padding = True

    def batch(self, sequences: Sequence[Sequence[int]], length: int | None = None) -> Tokens:
        """Token lists as one batch: padded to `length`, else to the longest one where that is exact
        (`cuts_padding`), else to the full context the model was trained on."""
        if length is None and not self.cuts_padding:
            length = self.max_length
        return pad(sequences, self.pad_id, length)

    def tokenize(self, texts: Sequence[str], length: int | None = None) -> Tokens:
        return self.batch(self.token_lists(texts), length)

    def count_words(self, phrase: str) -> int:
        """How many tokens `phrase` takes, special tokens excluded."""
        return len(self.tokenizer(self.clean(phrase), add_special_tokens=False)["input_ids"])

    @property
    def num_special_tokens(self) -> int:
        """Tokens the tokenizer adds to every text (CLIP: start and end; SigLIP: end only)."""
        return self.tokenizer.num_special_tokens_to_add()

    # -- the three places the towers differ ----------------------------------------------
    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_mask(self, tokens: Tokens, length: int) -> torch.Tensor | None:
        raise NotImplementedError

    block_kwargs: dict = {}

    def pool(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError

    # -- the prompted forward ----------------------------------------------------------
    def forward(self, tokens: Tokens, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised features; `prompts` is (depth, n_ctx, width) or None for plain text."""
        ids = tokens.ids
        x = self.token_embedding(ids)
        depth, start = 0, self.prompt_start
        if prompts is not None:
            depth = prompts.shape[0]
            x = _replace(x, prompts[0], start)
        x = self.add_positions(x)
        mask = self.attention_mask(tokens, ids.shape[1])
        for i, block in enumerate(self.blocks):
            if 1 <= i < depth:
                x = _replace(x, prompts[i], start)
            x = block(x, attention_mask=mask, **self.block_kwargs)
        return F.normalize(self.pool(x, tokens).float(), dim=-1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256, max_tokens: int | None = None) -> torch.Tensor:
        """Plain (unprompted) normalised features of `texts`, on the CPU, in the order given."""
        return self.encode_lists(self.token_lists(texts) if len(texts) else [], None, batch_size, max_tokens)

    @torch.no_grad()
    def encode_lists(self, lists: Sequence[Sequence[int]], prompts: torch.Tensor | None = None, batch_size: int = 256,
                     max_tokens: int | None = None, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Normalised features of token lists (with `prompts`, if given), on the CPU, in the order given.

        Lists are batched in order of length, at most `batch_size` lists and about `max_tokens`
        tokens a batch, so each batch holds sequences of about one length and little compute goes
        to padding; the features equal those of batches in the given order up to float rounding
        (other batch shapes), nothing else. `progress(n)` is called after each batch of n.

        `max_tokens` defaults to `token_budget()`: on a CPU, small batches whose activations stay
        in cache and are reused by the allocator (1,024 tokens: ViT-B/16's MLP activations are
        8 MiB; at 8,192 they are 64 MiB, mapped and unmapped by the allocator every layer, and
        encoding ran 1.45x slower); on a GPU, large ones that fill it.
        """
        max_tokens = max_tokens or self.token_budget()
        order = sorted(range(len(lists)), key=lambda i: len(lists[i]))
        out = torch.empty(len(lists), self.feature_dim)
        part: list[int] = []
        for n, i in enumerate(order):
            part.append(i)
            last = n == len(order) - 1
            if last or len(part) == batch_size or (len(part) + 1) * len(lists[order[n + 1]]) > max_tokens:
                out[part] = self(self.batch([lists[j] for j in part]).to(self.device), prompts).float().cpu()
                if progress:
                    progress(len(part))
                part = []
        return out

    def token_budget(self) -> int:
        """Tokens per batch of one-time encoding on this tower's device (see `encode_lists`)."""
        return 1024 if self.device.type == "cpu" else 8192

    def step_groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """The groups `forward_lists` runs sequences of these lengths in. One more pass costs
        python and kernel launches: about 48 tokens of work on a CPU (measured), far more per
        token on a GPU (not measured here, so kept high there)."""
        if not self.cuts_padding:
            return [list(range(len(lengths)))]
        return length_groups(lengths, GROUP_OVERHEAD if self.device.type == "cpu" else 1024)

    def forward_lists(self, lists: Sequence[Sequence[int]], prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised features of token lists in the order given, with gradients (a training step).

        Where padding may be cut (`cuts_padding`), the lists run as a few batches of similar
        length (`length_groups`) instead of one padded to the longest: the causal mask means a
        feature never sees the padding, so only float rounding changes, while a step on the
        ImageNet class names pads about half of what it computes when run as one batch.
        """
        if not lists:
            return torch.empty(0, self.feature_dim, device=self.device)
        groups = self.step_groups([len(s) for s in lists])
        feats = torch.cat([self(self.batch([lists[i] for i in g]).to(self.device), prompts) for g in groups])
        order = torch.tensor([i for g in groups for i in g], device=feats.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=feats.device)
        return feats[inverse]

    @property
    def feature_dim(self) -> int:
        return self.width


GROUP_OVERHEAD = 48  # tokens of work one more forward pass costs on a CPU (measured: python, kernel launches)


def length_groups(lengths: Sequence[int], overhead: int = GROUP_OVERHEAD) -> list[list[int]]:
    """Indices of sequences of these lengths, split into groups of neighbouring lengths so that the
    padded tokens computed (each group padded to its longest) plus `overhead` per group are fewest.

    Exact dynamic programming over the distinct lengths, shortest first."""
    distinct = sorted(set(lengths))
    count = [0] * len(distinct)
    for n in lengths:
        count[distinct.index(n)] += 1
    best = [0.0] + [float("inf")] * len(distinct)  # best[j]: cost of the j shortest lengths
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        members = 0
        for i in range(j - 1, -1, -1):  # the last group holds lengths i..j-1
            members += count[i]
            cost = best[i] + members * distinct[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(distinct)
    while j:
        bounds.append((distinct[cut[j]], distinct[j - 1]))
        j = cut[j]
    by_length = sorted(range(len(lengths)), key=lambda k: lengths[k])
    return [[k for k in by_length if lo <= lengths[k] <= hi] for lo, hi in reversed(bounds)]


def _replace(x: torch.Tensor, ctx: torch.Tensor, start: int) -> torch.Tensor:
    """x with the n_ctx positions from `start` on replaced by `ctx` (n_ctx, width)."""
    ctx = ctx.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], ctx, x[:, start + ctx.shape[1] :]], dim=1)


def _text_start(tokenizer) -> int:
    """Where the tokenizer puts a text's first token: after the special tokens it puts in front
    (CLIP's <|startoftext|>, BERT's [CLS]); 0 when it adds tokens at the end only (SigLIP)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    return next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)


class ClipText(TextTower):
    """CLIP's text transformer: causal attention, feature = projection(LN(x at EOT))."""

    kind = "clip"

    def __init__(self, tokenizer, text_model: nn.Module, projection: nn.Linear):
        emb = text_model.embeddings
        super().__init__(tokenizer, emb.token_embedding, text_model.encoder.layers, emb.position_embedding.num_embeddings)
        self.position_embedding = emb.position_embedding
        self.final_layer_norm = text_model.final_layer_norm
        self.projection = projection
        text_model.config._attn_implementation = "sdpa"  # the causal flag below is an SDPA argument
        self.requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return self.projection.out_features

    text_rule = "openai-clip-clean"

    def clean(self, text: str) -> str:
        return clip_clean(text)

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.position_embedding.weight[: x.shape[1]]

    # No mask tensor: SDPA's own causal flag selects its fused kernels.
    block_kwargs = {"is_causal": True}

    def attention_mask(self, tokens: Tokens, length: int) -> None:
        return None

    def pool(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.lengths - 1]
        return self.projection(self.final_layer_norm(eot))


class BertText(TextTower):
    """A BERT-style encoder used as a sentence embedder: padding mask, mean pooling."""

    kind = "bert"

    def __init__(self, tokenizer, bert_model: nn.Module):
        emb = bert_model.embeddings
        max_len = min(emb.position_embeddings.num_embeddings, tokenizer.model_max_length or 512)
        super().__init__(tokenizer, emb.word_embeddings, bert_model.encoder.layer, max_len)
        self.position_embeddings = emb.position_embeddings
        self.token_type_embeddings = emb.token_type_embeddings
        self.embedding_norm = emb.LayerNorm
        bert_model.config._attn_implementation = "sdpa"  # boolean key-padding masks are an SDPA input
        self.requires_grad_(False)

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.position_embeddings.weight[: x.shape[1]] + self.token_type_embeddings.weight[0]
        return self.embedding_norm(x)

    def attention_mask(self, tokens: Tokens, length: int) -> torch.Tensor:
        keep = torch.arange(length, device=tokens.ids.device)[None, :] < tokens.lengths[:, None]
        return keep[:, None, None, :]

    def pool(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        keep = (torch.arange(x.shape[1], device=x.device)[None, :] < tokens.lengths[:, None]).to(x.dtype)
        return (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)


class SiglipText(TextTower):
    """SigLIP's text transformer: bidirectional attention with no padding mask over a fixed-length
    input, feature = head(LN(x at the last position)).

    The original models were trained on text padded to 64 tokens with EOS and no mask, and the
    last position, usually padding, is what they pool: every batch is padded to the full length
    with EOS, or the features would not be the model's. The tokenizer appends EOS and puts nothing
    in front, so the context vectors take positions 0..n_ctx-1.
    """

    kind = "siglip"
    cuts_padding = False
    text_rule = "siglip-canonical"

    def __init__(self, tokenizer, text_model: nn.Module):
        emb = text_model.embeddings
        super().__init__(tokenizer, emb.token_embedding, text_model.encoder.layers, emb.position_embedding.num_embeddings)
        self.position_embedding = emb.position_embedding
        self.final_layer_norm = text_model.final_layer_norm
        self.head = text_model.head
        text_model.config._attn_implementation = "sdpa"  # no mask: SDPA's fused kernels
        self.requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return self.head.out_features

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def clean(self, text: str) -> str:
        return siglip_clean(text)

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.position_embedding.weight[: x.shape[1]]

    def attention_mask(self, tokens: Tokens, length: int) -> None:
        return None

    def pool(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        if x.shape[1] != self.max_length:
            raise ValueError(f"SigLIP pools position {self.max_length - 1}: pad batches to {self.max_length} tokens "
                             f"(TextTower.batch), got {x.shape[1]}")
        return self.head(self.final_layer_norm(x[:, -1]))


class Siglip2Text(SiglipText):
    """SigLIP 2's text transformer: SigLIP's, with the Gemma tokenizer. Text is padded with Gemma's
    own <pad> token (not EOS) and lower-cased, as in training; punctuation is kept."""

    kind = "siglip2"
    text_rule = "lower"

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def clean(self, text: str) -> str:
        return text.lower()

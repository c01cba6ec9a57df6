"""A frozen text tower that accepts deep prompts.

This is the whole model ProText trains through. A prompted forward pass is:

    x = token_embedding(ids)                    # [SOT] ctx_1..ctx_n name tokens . [EOT]
    x[:, 1:1+n] = prompts[0]                    # layer-0 context replaces "a photo of a"
    x = add_positions(x)
    for i, block in enumerate(blocks):
        if 1 <= i < depth: x[:, 1:1+n] = prompts[i]   # deep prompts replace hidden states
        x = block(x)
    feature = normalize(pool(x))                # CLIP: LN at EOT, projection; BERT: mean

Two towers share that loop and differ in three places (positions, attention mask, pooling):
`ClipText` (causal mask, EOT pooling, projection) and `BertText` (padding mask, mean pooling,
as sentence-transformers encoders such as all-MiniLM-L6-v2 are used). The weights are the
`transformers` modules themselves; nothing is copied.

Because CLIP's mask is causal and it pools at EOT, tokens after EOT cannot change the
feature: a batch may be cut to its longest sequence with no change in the result. BERT's
padding mask gives the same guarantee.

CLIP text is cleaned as OpenAI's tokenizer cleaned it in training (`clip_clean`) before
`transformers`' tokenizer sees it; that one only applies NFC, collapses whitespace and lowers
case, so curly quotes and HTML entities would otherwise become other tokens.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Sequence

import ftfy
import torch
import torch.nn.functional as F
from torch import nn

_WHITESPACE = re.compile(r"\s+")


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


@dataclass
class Tokens:
    """Token ids of a batch, padded to its longest sequence, and each sequence's real length."""

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

    def tokenize(self, texts: Sequence[str], length: int | None = None) -> Tokens:
        return pad(self.token_lists(texts), self.pad_id, length)

    def count_words(self, phrase: str) -> int:
        """How many tokens `phrase` takes, special tokens excluded."""
        return len(self.tokenizer(self.clean(phrase), add_special_tokens=False)["input_ids"])

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
        depth = 0
        if prompts is not None:
            depth, n = prompts.shape[0], prompts.shape[1]
            x = _replace(x, prompts[0], n)
        x = self.add_positions(x)
        mask = self.attention_mask(tokens, ids.shape[1])
        for i, block in enumerate(self.blocks):
            if 1 <= i < depth:
                x = _replace(x, prompts[i], n)
            x = block(x, attention_mask=mask, **self.block_kwargs)
        return F.normalize(self.pool(x, tokens).float(), dim=-1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Plain (unprompted) normalised features of `texts`, on the CPU."""
        feats = []
        for start in range(0, len(texts), batch_size):
            toks = self.tokenize(texts[start : start + batch_size]).to(self.device)
            feats.append(self(toks).cpu())
        return torch.cat(feats) if feats else torch.empty(0, self.feature_dim)

    @property
    def feature_dim(self) -> int:
        return self.width


def _replace(x: torch.Tensor, ctx: torch.Tensor, n: int) -> torch.Tensor:
    """x with positions 1..n (just after the start token) replaced by `ctx`."""
    ctx = ctx.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :1], ctx, x[:, 1 + n :]], dim=1)


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

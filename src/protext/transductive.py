"""Transductive refinement (TransCLIP, Zanella et al., NeurIPS 2024): the unlabelled images being
labelled refine each other's predictions.

Given the features X (N, d, unit rows) of a whole collection and any head's probabilities ŷ (N, K),
it finds soft labels z (N, K) by block coordinate descent on three terms: a Gaussian mixture over
the features (one mean per class, one diagonal variance v shared by all), a kNN graph that pulls an
image towards its neighbours' labels, and a KL term that keeps z near ŷ. With TransCLIP's defaults:

- graph: each image's `neighbours` (3) nearest other images by cosine, weighted by that cosine, used
  as W + Wᵀ;
- start: z = ŷ; class means from each class's `confident` (8) likeliest images, their features
  weighted by ŷ and normalised; v = 1/d;
- `iterations` (10) rounds of: ℓ_ik = -½ Σ_t (x_it - μ_kt)² / v_t; `z_steps` (5) parallel z updates
  z_i ∝ ŷ_i^kl · exp(ℓ_i / tau + ((Wz)_i + (Wᵀz)_i) / (2·neighbours)), tau = 50;
  then μ_k = normalise(Σ_i z_ik x_i), v_t = Σ_ik z_ik (x_it - μ_kt)² / N; and one last z update.

TransCLIP's own initial predictions are softmax(100 · X Tᵀ) over one template's text embeddings T:
a `clip` head on a CLIP backbone (logit scale 100) gives exactly those.

Everything runs in blocks of rows, so the only state is the features, the graph (N × neighbours)
and five (N, K) arrays; with `store` those live in memory-mapped files there and the working
memory is a few blocks. The graph is exact, found block against block: N² · d multiply-adds, the
cost that limits the collection (a million images of 512-d features is 5·10¹⁴, hours on a few CPU
cores). Unlike TransCLIP's code, an image is never its own neighbour even when it has duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .context import Context
from .errors import ProtextError


@dataclass(frozen=True)
class TransductiveSettings:
    """TransCLIP's zero-shot settings."""

    neighbours: int = 3
    iterations: int = 10
    z_steps: int = 5
    tau: float = 50.0
    kl: float = 1.0
    confident: int = 8
    block: int = 2048  # rows per block (memory, not results)

    def __post_init__(self) -> None:
        for name in ("neighbours", "iterations", "z_steps", "confident", "block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "iterations" else 1):
                raise ProtextError(f"transductive setting {name} must be a positive integer, got {value!r}")


def transclip_probabilities(features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """TransCLIP's initial predictions: softmax over 100 · cosine."""
    return torch.softmax(100.0 * features.float() @ class_embeddings.float().T, dim=1)


class Arrays:
    """(rows, cols) float32 arrays in memory, or in memory-mapped files under `store`."""

    def __init__(self, store: str | Path | None):
        self.store = None if store is None else Path(store)
        if self.store is not None:
            self.store.mkdir(parents=True, exist_ok=True)
        self.files: dict[int, Path] = {}

    def new(self, name: str, rows: int, cols: int, dtype=np.float32) -> torch.Tensor:
        if self.store is None:
            return torch.from_numpy(np.zeros((rows, cols), dtype))
        path = self.store / f"{name}.npy"
        out = torch.from_numpy(np.lib.format.open_memmap(path, "w+", dtype, (rows, cols)))
        self.files[out.data_ptr()] = path
        return out

    def remove(self, keep: torch.Tensor | None = None) -> None:
        """Delete the files of every array but `keep` (a mapped file stays readable until it is closed)."""
        for ptr, path in list(self.files.items()):
            if keep is None or ptr != keep.data_ptr():
                path.unlink(missing_ok=True)
                del self.files[ptr]


def blocks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def neighbours(features: torch.Tensor, k: int, block: int = 2048, columns: int = 32768, arrays: Arrays | None = None,
               ctx: Context = Context()) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `k` nearest other rows by dot product: (indices (N, k), similarities (N, k)),
    block of rows against block of columns, never an N × N matrix."""
    n = len(features)
    if n <= k:
        raise ProtextError(f"transductive labelling needs more than {k} readable images (the neighbours of each), "
                           f"got {n}")
    arrays = arrays or Arrays(None)
    index = arrays.new("neighbour_index", n, k, np.int64)
    value = arrays.new("neighbour_value", n, k)
    with ctx.bar(n, "neighbours", "img") as bar:
        for rows in blocks(n, block):
            x = features[rows].float()
            best_v = torch.full((len(x), k), float("-inf"))
            best_i = torch.zeros(len(x), k, dtype=torch.int64)
            for cols in blocks(n, columns):
                s = x @ features[cols].float().T
                own = torch.arange(rows.start, rows.stop)
                inside = (own >= cols.start) & (own < cols.stop)
                s[inside.nonzero().squeeze(1), own[inside] - cols.start] = float("-inf")  # never oneself
                top = s.topk(min(k, s.shape[1]), dim=1)
                v = torch.cat([best_v, top.values], 1)
                i = torch.cat([best_i, top.indices + cols.start], 1)
                keep = v.topk(k, dim=1).indices
                best_v, best_i = v.gather(1, keep), i.gather(1, keep)
            index[rows], value[rows] = best_i, best_v
            bar.update(len(x))
    return index, value


def refine(features: torch.Tensor, probs: torch.Tensor, settings: TransductiveSettings = TransductiveSettings(),
           store: str | Path | None = None, ctx: Context = Context()) -> torch.Tensor:
    """Soft labels z (N, K) for `features` (N, d, unit rows) from initial `probs` (N, K), TransCLIP's
    way (see the module's docstring); rows of z sum to 1. With `store` (a folder), the (N, K) state
    lives in memory-mapped files there, and the returned z is the one left: delete the folder when done."""
    n, d = features.shape
    if probs.shape[0] != n:
        raise ProtextError(f"{probs.shape[0]} rows of predictions for {n} images")
    k_classes = probs.shape[1]
    s = settings
    arrays = Arrays(store)
    size = s.block
    index, value = neighbours(features, s.neighbours, size, arrays=arrays, ctx=ctx)
    prior, z, next_z, loglik, back = (arrays.new(name, n, k_classes)
                                      for name in ("prior", "z", "next_z", "loglik", "back"))
    for rows in blocks(n, size):
        p = probs[rows].float()
        prior[rows] = p if s.kl == 1 else p ** s.kl
        z[rows] = p

    # means from each class's likeliest images, weighted by their probabilities
    confident = min(s.confident, n)
    top_v = torch.full((confident, k_classes), float("-inf"))
    top_i = torch.zeros(confident, k_classes, dtype=torch.int64)
    for rows in blocks(n, size):
        v = torch.cat([top_v, probs[rows].float()], 0)
        i = torch.cat([top_i, torch.arange(rows.start, rows.stop)[:, None].expand(-1, k_classes)], 0)
        keep = v.topk(confident, dim=0).indices
        top_v, top_i = v.gather(0, keep), i.gather(0, keep)
    mu = F.normalize(torch.einsum("tk,tkd->kd", top_v, features[top_i.reshape(-1)].float().view(confident, k_classes, d)),
                     dim=1)
    var = torch.full((d,), 1.0 / d)

    with ctx.bar(s.iterations + 1, "transductive", "round") as bar:
        for round_ in range(s.iterations + 1):
            inverse = 1.0 / var
            mu_term = 0.5 * (mu * mu * inverse).sum(1)
            for rows in blocks(n, size):
                x = features[rows].float()
                loglik[rows] = -0.5 * (x * x @ inverse)[:, None] + (x * inverse) @ mu.T - mu_term[None]
            for _ in range(s.z_steps):
                back.zero_()
                for rows in blocks(n, size):  # Wᵀz: each image's weight on its neighbours, sent to them
                    sent = (value[rows, :, None] * z[rows][:, None, :]).reshape(-1, k_classes)
                    back.index_add_(0, index[rows].reshape(-1), sent)
                for rows in blocks(n, size):
                    pulled = (value[rows, :, None] * z[index[rows]]).sum(1) + back[rows]
                    a = loglik[rows] / s.tau + pulled / (2 * s.neighbours)
                    u = prior[rows] * torch.exp(a - a.max(1, keepdim=True).values)
                    next_z[rows] = u / u.sum(1, keepdim=True)
                z, next_z = next_z, z
            bar.update(1)
            if round_ == s.iterations:
                break
            weighted = torch.zeros(k_classes, d)
            squares = torch.zeros(d)
            mass = torch.zeros(k_classes)
            for rows in blocks(n, size):
                x, zr = features[rows].float(), z[rows]
                weighted += zr.T @ x
                squares += zr.sum(1) @ (x * x)
                mass += zr.sum(0)
            mu = F.normalize(weighted / mass.clamp_min(1e-12)[:, None], dim=1)
            var = (squares - 2 * (weighted * mu).sum(0) + mass @ (mu * mu)) / mass.sum()
            var = var.clamp_min(1e-12)
    arrays.remove(keep=z)
    return z

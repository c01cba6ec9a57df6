"""AWT (Zhu et al., NeurIPS 2024): augmented image views against a class's descriptions, each side
weighted by prediction entropy, matched by optimal transport.

For one image with V views (view 0 the image itself, `images.views`) and classes whose texts are
P prompts each ("<template>." and "<template>. <description>" for its first descriptions), with
`out[v, p, c] = scale · cos(view v, prompt p of class c)`:

- view weights: `a = softmax_v(-H(mean_p out[v, :, :]) / tau_image)`, H the entropy over classes;
- prompt weights, from view 0 alone: `b[c] = softmax_p(-H(m with m_c replaced by out[0, p, c]) / tau_text)`,
  where `m = mean_p out[0, p, :]`;
- per class, Sinkhorn with the cost `1 - cos`, kernel `exp(-(1 - cos) / epsilon)`, row marginal `a`
  and column marginal `b[c]` (at most `iterations` rounds, stopping when the row scaling moves by
  less than `tolerance` on average), plan `T_c`;
- the class's logit is `sum_{v,p} T_c[v, p] · out[v, p, c]`.

The defaults are AWT's (50 views, 50 descriptions, both temperatures 0.5, epsilon 0.1, 100
iterations, tolerance 0.01). Classes with fewer descriptions than others have their prompt rows
padded with zeros, which take no weight and no transport.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AwtSettings:
    views: int = 50
    descriptions: int = 50
    tau_image: float = 0.5
    tau_text: float = 0.5
    epsilon: float = 0.1
    iterations: int = 100
    tolerance: float = 1e-2
    seed: int = 0


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last axis."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def weights(out: torch.Tensor, valid: torch.Tensor, tau_image: float, tau_text: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(view weights (V,), prompt weights (C, P)) of one image's `out` (V, P, C); `valid` (C, P) marks real prompts."""
    counts = valid.sum(1).to(out.dtype)  # prompts per class
    mask = valid.T.unsqueeze(0).to(out.dtype)  # (1, P, C)
    per_view = (out * mask).sum(1) / counts  # (V, C): each class's mean over its own prompts
    image = torch.softmax(-entropy(per_view) / tau_image, 0)
    m = per_view[0].double()  # (C,)
    x = out[0].double()  # (P, C): prompt p of class c in class c's place
    shift = torch.maximum(m.max(), x.max())
    e_m, e_x = (m - shift).exp(), (x - shift).exp()
    s_all, t_all = e_m.sum(), (e_m * (m - shift)).sum()
    s = s_all - e_m + e_x  # sum of exp over classes with class c's entry replaced, for each (p, c)
    t = t_all - e_m * (m - shift) + e_x * (x - shift)
    h = (s.log() - t / s).float()  # (P, C) entropy of each replaced row
    h = h.T.masked_fill(~valid, float("inf"))  # (C, P)
    return image, torch.softmax(-h / tau_text, 1)


def transport(out: torch.Tensor, scale: float, image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
              epsilon: float, iterations: int, tolerance: float, per_prompt: bool = False) -> torch.Tensor:
    """The class logits (C,) of one image: each class's transport-weighted logit (see the module's
    docstring); with `per_prompt`, each prompt's share of it (C, P), which sums to the logit."""
    cos = (out / scale).permute(2, 0, 1)  # (C, V, P)
    kernel = torch.exp(-(1 - cos) / epsilon) * valid.unsqueeze(1).to(cos.dtype)
    r = torch.ones(cos.shape[1], dtype=cos.dtype)
    c = torch.ones(cos.shape[0], cos.shape[2], dtype=cos.dtype)
    for _ in range(iterations):
        previous = r
        r = image / (kernel @ c.unsqueeze(-1)).squeeze(-1)  # (C, V)
        denominator = (kernel.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
        c = torch.where(valid, text / denominator.where(valid, torch.ones_like(denominator)), torch.zeros_like(text))
        if (r - previous).abs().mean() < tolerance:
            break
    plan = r.unsqueeze(-1) * c.unsqueeze(-2) * kernel
    shares = (plan * out.permute(2, 0, 1)).sum(1)
    return shares if per_prompt else shares.sum(1)


def _image(views: torch.Tensor, texts: torch.Tensor, valid: torch.Tensor, scale: float, bias: float | None,
           settings: AwtSettings, per_prompt: bool = False) -> torch.Tensor:
    flat = texts.reshape(-1, texts.shape[-1])
    out = (scale * views @ flat.T).view(views.shape[0], texts.shape[0], texts.shape[1]).permute(0, 2, 1)
    image, text = weights(out if bias is None else out + bias, valid, settings.tau_image, settings.tau_text)
    return transport(out, scale, image, text, valid, settings.epsilon, settings.iterations, settings.tolerance,
                     per_prompt)


def logits(features: torch.Tensor, texts: torch.Tensor, scale: float, bias: float | None,
           settings: AwtSettings = AwtSettings()) -> torch.Tensor:
    """AWT's logits (N, C) of images' view features (N, V, d) against class prompts (C, P, d),
    zero rows for padding; `bias` is SigLIP's (it shifts the logits, the transport is on cosines)."""
    valid = texts.norm(dim=-1) > 0
    rows = [_image(views, texts, valid, scale, bias, settings) for views in features]
    rows = [r if bias is None else r + bias for r in rows]
    return torch.stack(rows) if rows else torch.empty(0, texts.shape[0])


def shares(views: torch.Tensor, texts: torch.Tensor, scale: float, bias: float | None,
           settings: AwtSettings = AwtSettings()) -> torch.Tensor:
    """Each prompt's share (C, P) of one image's logits (its views (V, d)): what explains a label."""
    return _image(views, texts, texts.norm(dim=-1) > 0, scale, bias, settings, per_prompt=True)

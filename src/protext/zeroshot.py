"""Zero-shot classifier heads for any label set, and the `ProTextClassifier` API.

A head is a (classes, dim) matrix of L2-normalised class embeddings; logits are
logit_scale x image_feature . head. The heads:

- `clip`:         one template per dataset ("a photo of a {}.", "{} texture.", ...);
- `clip80`:       mean of the normalised features of CLIP's 80 ImageNet templates, renormalised;
- `cupl`:         mean of the normalised features of the class's descriptions, renormalised;
                  a class without descriptions falls back to `clip`, as in the paper;
- `protext`:      the learned prompts with "a photo of a {}.", or, for prompts learned on
                  another dataset (cross-dataset), the dataset's inference template
                  ("a photo of a {}, a type of pet."), as ProText's code does;
- `protext+cupl`: the renormalised mean of the `protext` and `cupl` embeddings.

Heads are computed once per (head, label set, dataset) and kept; plain text features come
from the on-disk text cache, so a head seen in an earlier run costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import Backbone, load_backbone
from .descriptions import load_descriptions, normalize_name
from .errors import ProtextError
from .images import UnreadableImage, load_pixels
from .model import ProText
from .templates import IMAGENET_80, clip_template, protext_template
from .train import encode_texts

HEADS = ("clip", "clip80", "cupl", "protext", "protext+cupl")


def ensemble(features: torch.Tensor) -> torch.Tensor:
    """CuPL's class embedding: the renormalised mean of normalised description features."""
    return F.normalize(features.mean(0), dim=-1)


def top1(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Top-1 accuracy (%) of cosine similarity; both sides are already normalised."""
    if len(labels) == 0:
        return float("nan")
    return 100.0 * ((features @ weights.T).argmax(1) == labels).float().mean().item()


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


class Heads:
    """Builds and memoises class-embedding matrices for one backbone."""

    def __init__(self, backbone: Backbone, prompts: ProText | None = None,
                 descriptions: Mapping[str, Sequence[str]] | None = None, cache_dir: Path | None = None,
                 cross_dataset: bool = False):
        self.backbone, self.prompts, self.cache_dir = backbone, prompts, cache_dir
        self.cross_dataset = cross_dataset
        self.descriptions = {normalize_name(k): list(v) for k, v in (descriptions or {}).items()}
        self._memo: dict[tuple, torch.Tensor] = {}
        self.fallbacks: dict[tuple, list[str]] = {}

    def _plain(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_texts(self.backbone, list(texts), self.cache_dir, show_progress=len(texts) > 5000)

    def get(self, head: str, classes: Sequence[str], dataset: str | None = None) -> torch.Tensor:
        key = (head, tuple(classes), dataset)
        if key not in self._memo:
            self._memo[key] = self._build(head, list(classes), dataset)
        return self._memo[key]

    def _build(self, head: str, classes: list[str], dataset: str | None) -> torch.Tensor:
        if head == "clip":
            return self._plain([clip_template(dataset).format(c) for c in classes])
        if head == "clip80":
            feats = self._plain([t.format(c) for c in classes for t in IMAGENET_80])
            return F.normalize(feats.view(len(classes), len(IMAGENET_80), -1).mean(1), dim=-1)
        if head == "cupl":
            return self._cupl(classes, dataset)
        if head in ("protext", "protext+cupl"):
            if self.prompts is None:
                raise ProtextError(f"head '{head}' needs learned prompts (--prompts DIR)")
            w = self.prompts.encode_classes(classes, protext_template(dataset, self.cross_dataset))
            return w if head == "protext" else F.normalize(w + self.get("cupl", classes, dataset), dim=-1)
        raise ProtextError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")

    def _cupl(self, classes: list[str], dataset: str | None) -> torch.Tensor:
        have = [c for c in classes if normalize_name(c) in self.descriptions]
        missing = [c for c in classes if normalize_name(c) not in self.descriptions]
        self.fallbacks[(tuple(classes), dataset)] = missing
        rows: dict[str, torch.Tensor] = {}
        if have:
            texts = [s for c in have for s in self.descriptions[normalize_name(c)]]
            feats = self._plain(texts)
            start = 0
            for c in have:
                n = len(self.descriptions[normalize_name(c)])
                rows[c] = ensemble(feats[start : start + n])
                start += n
        if missing:
            rows.update(zip(missing, self.get("clip", missing, dataset)))
        return torch.stack([rows[c] for c in classes])


@dataclass
class Prediction:
    """Per input image: top label and the probability of every class; unreadable files listed."""

    classes: list[str]
    labels: list[str]
    probs: torch.Tensor
    inputs: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        values, idx = self.probs.topk(min(k, self.probs.shape[1]), dim=1)
        return [[(self.classes[j], float(v)) for v, j in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, idx)]


class ProTextClassifier:
    """A zero-shot image classifier for any label set, with or without learned prompts.

    >>> clf = ProTextClassifier("openai/clip-vit-base-patch16", ["cat", "dog"], prompts="prompts/cross-dataset")
    >>> clf.predict(["pet.jpg"]).labels

    `dataset` (e.g. "oxford_pets") picks that dataset's templates for the `clip` head and,
    as for prompts learned on another dataset, ProText's inference template.
    """

    def __init__(self, backbone: Backbone | str | None, classes: Sequence[str], prompts: ProText | str | Path | None = None,
                 descriptions: Mapping[str, Sequence[str]] | str | Path | None = None, head: str | None = None,
                 dataset: str | None = None, cache_dir: Path | None = None, device: str | None = None):
        if isinstance(backbone, (str, Path)):
            backbone = load_backbone(str(backbone), device=device)
        if isinstance(prompts, (str, Path)):  # with a backbone given, it is checked against the prompts' fingerprint
            prompts = ProText.from_pretrained(prompts, backbone=backbone, device=device)
        if backbone is None:
            if prompts is None:
                raise ProtextError("give a backbone (Hub id, folder or Backbone), prompts, or both")
            backbone = prompts.backbone
        if backbone.image is None:
            raise ProtextError(f"backbone '{backbone.name}' has no image tower; image classification needs a CLIP")
        if isinstance(descriptions, (str, Path)):
            descriptions = load_descriptions(descriptions)
        self.backbone, self.dataset = backbone, dataset
        self.heads = Heads(backbone, prompts, descriptions, cache_dir, cross_dataset=dataset is not None)
        self.head = head or ("protext" if prompts is not None else "cupl" if descriptions else "clip")
        self.set_classes(classes)

    def set_classes(self, classes: Sequence[str]) -> None:
        """Change the label set; no retraining, only the new class embeddings are computed."""
        classes = list(classes)
        if not classes:
            raise ProtextError("no class names given")
        if len({normalize_name(c) for c in classes}) != len(classes):
            raise ProtextError("class names repeat (after normalising case and '_')")
        self.classes = classes
        self.weights = self.heads.get(self.head, classes, self.dataset)

    def image_features(self, images: Iterable[str | Path | Image.Image | torch.Tensor],
                       batch_size: int = 32) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        tower = self.backbone.image
        pixels, names, skipped = [], [], []
        for i, item in enumerate(images):
            if isinstance(item, torch.Tensor):
                batch = item if item.dim() == 4 else item[None]
                pixels.extend(batch)
                names.extend(f"tensor[{i}]" for _ in range(len(batch)))
                continue
            name = str(item) if isinstance(item, (str, Path)) else f"image[{i}]"
            try:
                pixels.append(load_pixels(item, tower.image_size, tower.mean, tower.std))
                names.append(name)
            except UnreadableImage as e:
                skipped.append((name, str(e)))
        feats = [tower(torch.stack(pixels[i : i + batch_size]).to(self.backbone.device)).cpu()
                 for i in range(0, len(pixels), batch_size)]
        return (torch.cat(feats) if feats else torch.empty(0, self.weights.shape[1])), names, skipped

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logit_scale * features @ self.weights.T

    def predict(self, images: Iterable[str | Path | Image.Image | torch.Tensor] | str | Path | Image.Image,
                batch_size: int = 32) -> Prediction:
        """Classify image files, PIL images or preprocessed (3, H, W) / (N, 3, H, W) tensors."""
        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, torch.Tensor) and images.dim() == 3):
            images = [images]
        feats, names, skipped = self.image_features(images, batch_size)
        probs = self.logits(feats).softmax(-1) if len(feats) else torch.empty(0, len(self.classes))
        return Prediction(self.classes, [self.classes[i] for i in probs.argmax(1).tolist()], probs, names, skipped)

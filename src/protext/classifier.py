"""`ProTextClassifier`: a zero-shot image classifier for any label set, built on the heads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from PIL import Image

from .backbone import Backbone, load_backbone
from .descriptions import load_descriptions, normalize_name
from .errors import ProtextError
from .heads import Heads, Waffle, default_heads, head_names
from .images import UnreadableImage, load_pixels
from .model import ProText, check_backbone
from .sources import load_descriptors, resolve


def _descriptions(spec: Mapping[str, Sequence[str]] | str | Path | None,
                  cache_dir: Path | None) -> Mapping[str, Sequence[str]] | None:
    """Descriptions given as a mapping, a file or a public set name (cupl:NAME)."""
    if spec is None or isinstance(spec, Mapping):
        return spec
    return load_descriptions(resolve(str(spec), cache_dir))


def _descriptors(spec: Mapping[str, Sequence[str]] | str | Path | None,
                 cache_dir: Path | None) -> Mapping[str, Sequence[str]] | None:
    """DCLIP descriptors given as a mapping, a file or a public set name (dclip:NAME)."""
    if spec is None or isinstance(spec, Mapping):
        return spec
    return load_descriptors(str(spec), cache_dir)


# How image-text logits become probabilities: a softmax over the label set (CLIP's training loss;
# the probabilities sum to 1), or each label's own sigmoid with the model's learned bias (SigLIP's).
SCORES = ("softmax", "sigmoid")


@dataclass
class Prediction:
    """Per input image: top label and the probability of every class (`scores` says which kind, see
    `SCORES`); unreadable files listed."""

    classes: list[str]
    labels: list[str]
    probs: torch.Tensor
    inputs: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    scores: str = "softmax"

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        values, idx = self.probs.topk(min(k, self.probs.shape[1]), dim=1)
        return [[(self.classes[j], float(v)) for v, j in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, idx)]


class ProTextClassifier:
    """A zero-shot image classifier for any label set, with or without learned prompts.

    >>> clf = ProTextClassifier.from_prompts("prompts/cross-dataset", ["cat", "dog"])
    >>> clf = ProTextClassifier.from_backbone("openai/clip-vit-base-patch16", ["cat", "dog"], head="clip80")
    >>> clf.predict(["pet.jpg"]).labels

    The constructor takes loaded objects; the two class methods load from names and paths.
    `dataset` (e.g. "oxford_pets") is where the classes come from: the `clip` head uses its
    template, and with `cross_dataset` (prompts learned on another dataset) the `protext` head
    uses its ProText inference template.
    """

    def __init__(self, backbone: Backbone, classes: Sequence[str], prompts: ProText | None = None,
                 descriptions: Mapping[str, Sequence[str]] | None = None, head: str | None = None,
                 dataset: str | None = None, cross_dataset: bool = False, cache_dir: Path | None = None,
                 descriptors: Mapping[str, Sequence[str]] | None = None, waffle: Waffle = Waffle()):
        if backbone.image is None:
            raise ProtextError(f"backbone '{backbone.name}' has no image tower; image classification needs a CLIP or SigLIP")
        if prompts is not None and prompts.backbone is not backbone:
            check_backbone(prompts.config, backbone, "prompts")
        self.backbone, self.dataset = backbone, dataset
        self.heads = Heads(backbone, prompts, descriptions, cache_dir, cross_dataset, descriptors, waffle)
        self.head = head or default_heads(prompts is not None, bool(descriptions))[-1]
        head_names(self.head)
        self.set_classes(classes)

    @classmethod
    def from_prompts(cls, prompts: str | Path | ProText, classes: Sequence[str], backbone: str | Backbone | None = None,
                     descriptions: Mapping[str, Sequence[str]] | str | None = None, head: str | None = None,
                     dataset: str | None = None, cross_dataset: bool = False, cache_dir: Path | None = None,
                     device: str | None = None, descriptors: Mapping[str, Sequence[str]] | str | None = None,
                     waffle: Waffle = Waffle()) -> "ProTextClassifier":
        """Learned prompts (a folder, Hub id or `ProText`) on their own backbone, or on `backbone`
        when given (a copy of the same weights, checked by fingerprint)."""
        if isinstance(backbone, (str, Path)):
            backbone = load_backbone(str(backbone), device=device)
        if not isinstance(prompts, ProText):
            prompts = ProText.from_pretrained(prompts, backbone=backbone, device=device)
        return cls(backbone or prompts.backbone, classes, prompts, _descriptions(descriptions, cache_dir), head,
                   dataset, cross_dataset, cache_dir, _descriptors(descriptors, cache_dir), waffle)

    @classmethod
    def from_backbone(cls, backbone: str | Path | Backbone, classes: Sequence[str],
                      descriptions: Mapping[str, Sequence[str]] | str | None = None, head: str | None = None,
                      dataset: str | None = None, cache_dir: Path | None = None, device: str | None = None,
                      descriptors: Mapping[str, Sequence[str]] | str | None = None,
                      waffle: Waffle = Waffle()) -> "ProTextClassifier":
        """A classifier without learned prompts: the template or description heads only."""
        if not isinstance(backbone, Backbone):
            backbone = load_backbone(str(backbone), device=device)
        return cls(backbone, classes, None, _descriptions(descriptions, cache_dir), head, dataset, False, cache_dir,
                   _descriptors(descriptors, cache_dir), waffle)

    @classmethod
    def from_weights(cls, backbone: Backbone, classes: Sequence[str], weights: torch.Tensor,
                     head: str = "given") -> "ProTextClassifier":
        """A classifier from class embeddings built elsewhere (on a Ray driver, or exported): no text
        is encoded, so only the image tower is needed. `head` names where the embeddings came from."""
        if backbone.image is None:
            raise ProtextError(f"backbone '{backbone.name}' has no image tower")
        if tuple(weights.shape) != (len(classes), backbone.text.feature_dim):
            raise ProtextError(f"class embeddings have shape {tuple(weights.shape)}, expected "
                               f"({len(classes)}, {backbone.text.feature_dim}) for {len(classes)} classes on '{backbone.name}'")
        clf = cls.__new__(cls)
        clf.backbone, clf.dataset, clf.heads, clf.head = backbone, None, Heads(backbone), head
        clf.classes, clf.weights = list(classes), weights.float().cpu()
        return clf

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
        """The model's image-text logits: scale · cosine, plus SigLIP's learned bias."""
        logits = self.backbone.logit_scale * features @ self.weights.T
        return logits if self.backbone.logit_bias is None else logits + self.backbone.logit_bias

    def check_scores(self, scores: str) -> None:
        """Refuse a kind of probabilities this backbone cannot give (sigmoid needs SigLIP's bias)."""
        if scores not in SCORES:
            raise ProtextError(f"scores must be {' or '.join(SCORES)}, got {scores!r}")
        if scores == "sigmoid" and self.backbone.logit_bias is None:
            raise ProtextError(f"sigmoid scores need a backbone trained with a sigmoid loss and a learned bias "
                               f"(SigLIP); '{self.backbone.name}' has none: use softmax")

    def probabilities(self, features: torch.Tensor, scores: str = "softmax") -> torch.Tensor:
        """softmax: over the label set, summing to 1; sigmoid: each label's own, sigmoid(logit) with the bias."""
        self.check_scores(scores)
        logits = self.logits(features)
        return logits.sigmoid() if scores == "sigmoid" else logits.softmax(-1)

    def predict(self, images: Iterable[str | Path | Image.Image | torch.Tensor] | str | Path | Image.Image,
                batch_size: int = 32, scores: str = "softmax") -> Prediction:
        """Classify image files, PIL images or preprocessed (3, H, W) / (N, 3, H, W) tensors; `scores`
        is softmax (over the label set) or sigmoid (per label, SigLIP only). Top-1 is the same either way."""
        self.check_scores(scores)
        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, torch.Tensor) and images.dim() == 3):
            images = [images]
        feats, names, skipped = self.image_features(images, batch_size)
        probs = self.probabilities(feats, scores) if len(feats) else torch.empty(0, len(self.classes))
        return Prediction(self.classes, [self.classes[i] for i in probs.argmax(1).tolist()], probs, names, skipped,
                          scores)

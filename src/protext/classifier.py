"""`ProTextClassifier`: a zero-shot image classifier for any label set, built on the heads.

`ClassifierOptions` is what a classifier is built from, by name (a prompt folder, a backbone id,
a description set): the options the command line, `serve` and the Python API share; its fields
are the commands' flags. `load_inputs` loads them once (`serve` builds a classifier per label
set from the result), `build_classifier` makes one classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import DEFAULT_BACKBONE, PRECISIONS, Backbone, load_backbone
from .context import Context
from .descriptions import load_descriptions, load_differential, normalize_name
from .engine import run
from .errors import ProtextError
from .flags import option
from .heads import Heads, HeadInputs, Waffle, default_heads, head_names
from .images import MAX_PIXELS
from .model import ProText, check_backbone
from .sources import load_descriptors, resolve
from .transductive import TransductiveSettings

# How image-text logits become probabilities: a softmax over the label set (CLIP's training loss;
# the probabilities sum to 1), or each label's own sigmoid with the model's learned bias (SigLIP's).
ACTIVATIONS = ("softmax", "sigmoid")


@dataclass
class ClassifierOptions:
    """What a classifier is built from. Each field is a flag of `predict`, `label`, `serve`, `export`
    and `eval`; in Python the names may also be loaded objects (a `Backbone`, a `ProText`, a dict
    of descriptions)."""

    prompts: str | None = option(None, "prompt folder or Hub id (default: none: the plain heads on --backbone)")
    backbone: str | None = option(None, "Hub id or local folder of a CLIP or SigLIP model (default: the one "
                                        f"--prompts were trained on, else {DEFAULT_BACKBONE}); with --prompts, "
                                        "checked against their weights' fingerprint")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the backbone")
    precision: str = option("fp32", "the image tower's arithmetic: fp32; int8 (CPU only: dynamic quantization, about "
                                     "3x faster, features within about 0.9997 cosine of fp32's); bf16 (GPUs, and CPUs "
                                     "with AVX-512 BF16 or AMX); fp16 (CUDA only)", choices=PRECISIONS)
    head: str | None = option(None, "one head, or heads joined with '+' (default: protext with --prompts, else cupl "
                                    "with --descriptions, else clip)")
    dataset: str | None = option(None, "the dataset the classes come from (e.g. oxford_pets): the clip head uses its "
                                       "template, dclip its full-stop rule")
    descriptions: str | None = option(None, "CuPL-style description JSON or set name (cupl:NAME), for cupl")
    descriptors: str | None = option(None, "DCLIP descriptor JSON or set name (dclip:NAME), for dclip")
    differential: str | None = option(None, "differential descriptions JSON (from describe --differential), for fudd")
    waffle_count: int = option(15, "waffle: pairs of random descriptors")
    waffle_seed: int = option(0, "waffle: seed of the random descriptors")
    waffle_concept: str | None = option(None, "waffle: a high-level concept, as in 'A photo of a {concept}: a "
                                              "{class}, which ...'")
    cross_dataset: bool = option(False, "the prompts were learned on another dataset: the protext head uses "
                                        "--dataset's inference template ('a photo of a {}, a type of pet.'), as the "
                                        "cross-dataset benchmark does")


def load_backbone_of(options: ClassifierOptions, ctx: Context = Context()) -> tuple[Backbone, ProText | None]:
    """The backbone and the prompts (if any) the options name; prompts load on `backbone` when it
    is given (checked by fingerprint), else on the backbone they were trained on."""
    backbone = options.backbone
    if isinstance(backbone, (str, Path)):
        backbone = load_backbone(str(backbone), options.revision, ctx.device, ctx.progress)
    prompts = options.prompts
    if prompts is not None and not isinstance(prompts, ProText):
        prompts = ProText.from_pretrained(prompts, backbone=backbone, device=ctx.device, progress=ctx.progress)
    if backbone is None:
        backbone = prompts.backbone if prompts is not None else load_backbone(DEFAULT_BACKBONE, options.revision,
                                                                               ctx.device, ctx.progress)
    return backbone.at_precision(options.precision), prompts


def load_inputs(options: ClassifierOptions, ctx: Context = Context()) -> tuple[Backbone, HeadInputs]:
    """The backbone and everything the heads read, loaded once."""
    descriptions, descriptors = options.descriptions, options.descriptors
    if descriptions is not None and not isinstance(descriptions, Mapping):
        # blanks kept in place for AWT, which counts them; every other head skips them
        descriptions = load_descriptions(resolve(str(descriptions), ctx, "cupl:"), keep_blank=True)
    if descriptors is not None and not isinstance(descriptors, Mapping):
        descriptors = load_descriptors(str(descriptors), ctx)
    waffle = Waffle(options.waffle_count, options.waffle_seed, options.waffle_concept)
    differential = options.differential
    if differential is not None and not isinstance(differential, Mapping):
        differential = load_differential(differential)
    backbone, prompts = load_backbone_of(options, ctx)
    return backbone, HeadInputs(prompts, descriptions, descriptors, waffle, options.dataset, options.cross_dataset,
                                differential=differential)


def build_classifier(options: ClassifierOptions, classes: Sequence[str], ctx: Context = Context()) -> "ProTextClassifier":
    """The classifier the options describe, for `classes`."""
    backbone, inputs = load_inputs(options, ctx)
    return ProTextClassifier(backbone, classes, options.head, inputs, ctx)


@dataclass
class Prediction:
    """Per input image: top label and the probability of every class (`activation` says which kind,
    see `ACTIVATIONS`); unreadable files listed."""

    classes: list[str]
    labels: list[str]
    probs: torch.Tensor
    inputs: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    activation: str = "softmax"
    # with predict(explain=k): per image, the k texts of its label that weighed most, with their scores
    explanations: list[list[tuple[str, float]]] | None = None

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        values, idx = self.probs.topk(min(k, self.probs.shape[1]), dim=1)
        return [[(self.classes[j], float(v)) for v, j in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, idx)]


class ProTextClassifier:
    """A zero-shot image classifier for any label set, with or without learned prompts.

    >>> clf = ProTextClassifier.from_prompts("prompts/cross-dataset", ["cat", "dog"])
    >>> clf = ProTextClassifier.from_backbone("openai/clip-vit-base-patch16", ["cat", "dog"], head="clip80")
    >>> clf.predict(["pet.jpg"]).labels

    The constructor takes loaded objects; `build_classifier` and the two class methods load from
    names and paths (`ClassifierOptions`).
    """

    def __init__(self, backbone: Backbone, classes: Sequence[str], head: str | None = None,
                 inputs: HeadInputs = HeadInputs(), ctx: Context = Context()):
        if backbone.image is None:
            raise ProtextError(f"backbone '{backbone.name}' has no image tower; image classification needs a CLIP or SigLIP")
        if inputs.prompts is not None and inputs.prompts.backbone is not backbone:
            check_backbone(inputs.prompts.config, backbone, "prompts")
        self.backbone, self.inputs, self.ctx = backbone, inputs, ctx
        self.heads = Heads(backbone, inputs, ctx)
        self.head = (head or default_heads(inputs)[-1]).strip()
        head_names(self.head)
        self.set_classes(classes)

    @classmethod
    def from_prompts(cls, prompts: str | Path | ProText, classes: Sequence[str], ctx: Context = Context(),
                     **options) -> "ProTextClassifier":
        """Learned prompts (a folder, Hub id or `ProText`) on their own backbone, or on `backbone=`
        when given (a copy of the same weights, checked by fingerprint); other keywords are
        `ClassifierOptions` fields."""
        return build_classifier(ClassifierOptions(prompts=prompts, **options), classes, ctx)

    @classmethod
    def from_backbone(cls, backbone: str | Path | Backbone, classes: Sequence[str], ctx: Context = Context(),
                      **options) -> "ProTextClassifier":
        """A classifier without learned prompts: the template or description heads only."""
        return build_classifier(ClassifierOptions(backbone=backbone, **options), classes, ctx)

    @classmethod
    def from_weights(cls, backbone: Backbone, classes: Sequence[str], weights: torch.Tensor,
                     head: str = "given") -> "ProTextClassifier":
        """A classifier from class embeddings built elsewhere (on a Ray driver, or exported): no text
        is encoded, so only the image tower is needed. `head` names where the embeddings came from."""
        if backbone.image is None:
            raise ProtextError(f"backbone '{backbone.name}' has no image tower")
        if weights.dim() != 2 + (head == "awt") or weights.shape[0] != len(classes) or \
                weights.shape[-1] != backbone.text.feature_dim:
            raise ProtextError(f"class embeddings have shape {tuple(weights.shape)}, expected "
                               f"({len(classes)}, {backbone.text.feature_dim}) for {len(classes)} classes on '{backbone.name}'")
        clf = cls.__new__(cls)
        clf.backbone, clf.inputs, clf.ctx, clf.head = backbone, HeadInputs(), Context(), head
        clf.heads = Heads(backbone)
        clf.classes, clf.weights = list(classes), weights.float().cpu()
        return clf

    @property
    def dataset(self) -> str | None:
        return self.inputs.dataset

    def set_classes(self, classes: Sequence[str]) -> None:
        """Change the label set; no retraining, only the new class embeddings are computed."""
        classes = list(classes)
        if not classes:
            raise ProtextError("no class names given")
        blank = [i for i, c in enumerate(classes, 1) if not str(c).strip()]
        if blank:
            raise ProtextError(f"class {blank[0]} of {len(classes)} has an empty name; every class needs one")
        if len({normalize_name(c) for c in classes}) != len(classes):
            raise ProtextError("class names repeat (after normalising case and '_')")
        self.classes = classes
        self.weights = self.heads.get(self.head, classes)

    def image_features(self, images: Iterable[str | Path | Image.Image | torch.Tensor], batch_size: int | None = None,
                       max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        """Features of the readable images, their names, and (name, reason) of the others."""
        items, names = [], []
        for i, item in enumerate(images):
            if isinstance(item, torch.Tensor):
                batch = item if item.dim() == 4 else item[None]
                items.extend(batch)
                names.extend(f"tensor[{i}]" for _ in range(len(batch)))
            else:
                items.append(item)
                names.append(str(item) if isinstance(item, (str, Path)) else f"image[{i}]")
        augment = (self.views, self.inputs.awt.seed) if self.views else None
        part = next(run(self.backbone, [(0, items)], batch_size, workers=min(4, max(1, len(items))),
                        max_pixels=max_pixels, augment=augment))
        good = [j for j, e in enumerate(part.errors) if e is None]
        return (part.features[good], [names[j] for j in good],
                [(names[j], e) for j, e in enumerate(part.errors) if e is not None])

    @property
    def views(self) -> int:
        """Augmented views of each image the head scores besides the image itself (AWT's 50; else 0)."""
        return self.heads.views(self.head)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The model's image-text logits: scale · cosine, plus SigLIP's learned bias (or the head's own rule,
        on view features (N, 1 + views, d))."""
        return self.heads.logits(self.head, features, self.weights, self.classes)

    def check_activation(self, activation: str) -> None:
        """Refuse a kind of probabilities this backbone cannot give (sigmoid needs SigLIP's bias)."""
        if activation not in ACTIVATIONS:
            raise ProtextError(f"activation must be {' or '.join(ACTIVATIONS)}, got {activation!r}")
        if activation == "sigmoid" and self.backbone.logit_bias is None:
            raise ProtextError(f"sigmoid probabilities need a backbone trained with a sigmoid loss and a learned bias "
                               f"(SigLIP); '{self.backbone.name}' has none: use softmax")

    def probabilities(self, features: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
        """softmax: over the label set, summing to 1; sigmoid: each label's own, sigmoid(logit) with the bias."""
        self.check_activation(activation)
        logits = self.logits(features)
        return logits.sigmoid() if activation == "sigmoid" else logits.softmax(-1)

    def refine(self, features: torch.Tensor, settings: TransductiveSettings | None = None,
               store: str | Path | None = None) -> torch.Tensor:
        """Transductive probabilities (N, C) for a whole collection's image features (N, d): this head's
        predictions refined together with TransCLIP's procedure (`protext.transductive`)."""
        from .transductive import refine

        if self.views:
            raise ProtextError(f"head '{self.head}' scores augmented views; transductive refinement reads one "
                               f"feature per image: choose another head")
        features = F.normalize(features.float(), dim=-1)
        return refine(features, self.probabilities(features), settings or TransductiveSettings(), store, self.ctx)

    def predict(self, images: Iterable[str | Path | Image.Image | torch.Tensor] | str | Path | Image.Image,
                batch_size: int | None = None, activation: str = "softmax", max_pixels: int = MAX_PIXELS,
                explain: int = 0) -> Prediction:
        """Classify image files, PIL images or preprocessed (3, H, W) / (N, 3, H, W) tensors; `activation`
        is softmax (over the label set) or sigmoid (per label, SigLIP only). Top-1 is the same either way.
        With `explain=k`, `explanations` holds the k texts that weighed most for each label (see `explain`)."""
        self.check_activation(activation)
        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, torch.Tensor) and images.dim() == 3):
            images = [images]
        feats, names, skipped = self.image_features(images, batch_size, max_pixels)
        probs = self.probabilities(feats, activation) if len(feats) else torch.empty(0, len(self.classes))
        chosen = probs.argmax(1).tolist()
        return Prediction(self.classes, [self.classes[i] for i in chosen], probs, names, skipped, activation,
                          self.explain(feats, chosen, explain) if explain else None)

    def explain(self, features: torch.Tensor, labels: Sequence[int], k: int = 3) -> list[list[tuple[str, float]]]:
        """For each image's features and label (a class index), the `k` texts of that class that weighed
        most (`Heads.explain`): descriptions by cosine for cupl and dclip, AWT's prompts by their share
        of the logit, FuDD's captions by cosine. Refused for heads without texts of their own."""
        if k < 1:
            raise ProtextError(f"explain must be at least 1 text, got {k}")
        self.check_explains()
        return self.heads.explain(self.head, features, self.weights, self.classes, labels, k)

    def check_explains(self) -> None:
        """Refuse to explain with a head that has no texts of its own."""
        if not self.heads.explains(self.head):
            raise ProtextError(f"head '{self.head}' has no descriptions to explain a label with; explanations come "
                               f"from heads built from texts (cupl, dclip, awt, fudd, clip80, waffle)")

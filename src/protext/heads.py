"""Zero-shot heads: one (classes, dim) matrix of normalised class embeddings per label set.

Every head is one `Head` record in `HEADS`: what a class is (its sentences, or its name through
the learned prompts), what it needs (`HeadInputs`, the one bundle heads read), its name in
reports, and what an export records of it. Everything else derives from the table: the `--head`
help, the heads `eval --heads all` and the benchmark tables run, the heads `serve` lists, the
export's description, and the README's table (a test holds them together). One builder,
`Heads.get`, makes every head:

- a text head gives each class some sentences (one template, many templates, the class's own
  descriptions, or descriptor sentences); the class embedding is the mean of their normalised
  plain features, renormalised (CuPL, CLIP-80) or not (DCLIP, WaffleCLIP: then a class's score
  is the mean of its per-sentence cosine similarities). A class the head has no sentences for
  takes its `fallback` head's embedding, or is an error where the head has none;
- a prompt head encodes each class name through the learned prompts;
- heads joined with `+` ("protext+cupl") are the renormalised mean of their embeddings.

Plain text features come from the on-disk feature cache, so a sentence seen in any earlier
run is not encoded again; built heads are memoised per (head, label set).

Adding a head is one record here (and its tests); see ARCHITECTURE.md for a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .awt import AwtSettings
from .awt import logits as awt_logits
from .awt import shares as awt_shares
from .backbone import Backbone
from .baselines import characters_of, dclip_sentence, waffle_descriptors, waffle_prefix, word_vocabulary
from .context import Context
from .descriptions import normalize_name
from .errors import ProtextError
from .feature_cache import encode_texts
from .fudd import TOP_K, ambiguous_set, first_pass_text, second_pass_texts, symmetric, texts_of
from .fudd import logits as fudd_logits
from .model import ProText, prompted_text
from .templates import IMAGENET_80, awt_template, clip_template, ensemble_templates, protext_template


@dataclass(frozen=True)
class Waffle:
    """WaffleCLIP's settings: pairs of random descriptors, their seed, an optional high-level concept."""

    count: int = 15
    seed: int = 0
    concept: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ProtextError(f"--waffle-count must be at least 1, got {self.count!r}")


@dataclass(frozen=True)
class HeadInputs:
    """What heads read besides the class names, passed whole to every head.

    `dataset` is where the classes come from ("oxford_pets"): the clip head takes its template,
    DCLIP its full-stop rule, and with `cross_dataset` (prompts learned on another dataset) the
    protext head its ProText inference template. `template`, when given, is the one template of
    both the clip and protext heads (the image-free check compares them on the same text).
    """

    prompts: ProText | None = None
    descriptions: Mapping[str, Sequence[str]] | None = None
    descriptors: Mapping[str, Sequence[str]] | None = None
    waffle: Waffle = Waffle()
    dataset: str | None = None
    cross_dataset: bool = False
    template: str | None = None
    awt: AwtSettings = AwtSettings()
    differential: Mapping[str, Mapping[str, Sequence[str]]] | None = None
    fudd_top_k: int = TOP_K

    def has(self, need: str | None) -> bool:
        return need is None or getattr(self, need) is not None


@dataclass(frozen=True)
class Head:
    """One zero-shot head. A text head has `sentences(heads, classes, name)` (None: no sentences
    for that class); a prompt head has `encode(heads, classes)`. `needs` names the `HeadInputs`
    field it cannot run without and `given_by` how a user supplies it."""

    name: str
    method: str
    summary: str
    needs: str | None = None
    given_by: str = ""
    sentences: Callable[["Heads", Sequence[str], str], Sequence[str] | None] | None = None
    fallback: str | None = None
    renormalize: bool = True
    encode: Callable[["Heads", Sequence[str]], torch.Tensor] | None = None
    export: Callable[["Heads", Sequence[str]], dict] | None = None
    default: bool = False  # among the heads run when none is named (the last given one classifies)
    # A head that scores images itself (not by cosine with one embedding per class): `score(heads,
    # features, class_texts) -> logits`, on `views(heads)` augmented views of each image besides itself.
    score: Callable[["Heads", torch.Tensor, torch.Tensor, Sequence[str]], torch.Tensor] | None = None
    views: Callable[["Heads"], int] | None = None
    # What made one image's label: `explain(heads, features, weights, classes, label) -> [(text, share)]`;
    # a text head without one is explained by the cosine of each of the class's sentences.
    explain: Callable[["Heads", torch.Tensor, torch.Tensor, Sequence[str], int], list[tuple[str, float]]] | None = None


def _clip_template(heads: "Heads") -> str:
    return heads.inputs.template or clip_template(heads.inputs.dataset)


def _protext_template(heads: "Heads") -> str:
    return heads.inputs.template or protext_template(heads.inputs.dataset, heads.inputs.cross_dataset)


def _dclip(heads: "Heads", classes: Sequence[str], name: str) -> list[str] | None:
    descriptors = heads.descriptors.get(normalize_name(name))
    after = "." if heads.inputs.dataset == "imagenet" else ""  # DCLIP ends its sentences so on ImageNet only, not V2
    word = name.replace("_", " ")  # DCLIP's words for a class: underscores become spaces
    return None if descriptors is None else [dclip_sentence(word, d, after=after) for d in descriptors]


def _waffle(heads: "Heads", classes: Sequence[str], name: str) -> list[str]:
    prefix = waffle_prefix(heads.inputs.waffle.concept)
    return [f"{prefix}{dclip_sentence(name, d)}." for d in heads.waffle_descriptors(classes)]


def _protext_templates(heads: "Heads") -> list[str]:
    """The inference template, and with `templates` "ensemble" CLIP's 7 ensemble templates after it."""
    first = _protext_template(heads)
    return ensemble_templates(first) if heads.inputs.prompts.config.templates == "ensemble" else [first]


def _protext(heads: "Heads", classes: Sequence[str]) -> torch.Tensor:
    """The learned prompts over the prompts' templates (their renormalised mean), and with `blend` the
    frozen encoder's embedding of the same texts mixed in: `blend` of it, 1 - `blend` of the learned."""
    prompts, templates = heads.inputs.prompts, _protext_templates(heads)
    learned = torch.stack([prompts.encode_classes(classes, t) for t in templates])
    learned = ensemble(learned) if len(templates) > 1 else learned[0]
    blend = prompts.config.blend
    if not blend:
        return learned
    texts = [t.format(c) for t in templates for c in classes]
    frozen = ensemble(encode_texts(heads.backbone, texts, heads.ctx).view(len(templates), len(classes), -1))
    return F.normalize((1 - blend) * learned + blend * frozen, dim=-1)


def _awt_prompts(heads: "Heads", name: str) -> list[str]:
    """AWT's texts of a class: "<template>." then "<template>. <description>" for its first descriptions."""
    base = awt_template(heads.inputs.dataset).format(name.replace("_", " "))
    described = (heads.awt_descriptions.get(normalize_name(name)) or [])[: heads.inputs.awt.descriptions]
    return [base + "."] + [f"{base}. {d}" for d in described]


def _awt(heads: "Heads", classes: Sequence[str]) -> torch.Tensor:
    """(classes, prompts, dim): each class's prompt features, zero rows where a class has fewer."""
    prompts = {c: _awt_prompts(heads, c) for c in classes}
    flat = [p for c in classes for p in prompts[c]]
    feats = encode_texts(heads.backbone, flat, heads.ctx, show=len(flat) > 5000)
    out = torch.zeros(len(classes), max(len(p) for p in prompts.values()), feats.shape[1])
    start = 0
    for i, c in enumerate(classes):
        out[i, : len(prompts[c])] = feats[start : start + len(prompts[c])]
        start += len(prompts[c])
    return out


def _awt_score(heads: "Heads", features: torch.Tensor, texts: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
    backbone = heads.backbone
    return awt_logits(features, texts, backbone.logit_scale, backbone.logit_bias, heads.inputs.awt)


def _fudd(heads: "Heads", classes: Sequence[str]) -> torch.Tensor:
    """FuDD's first pass: one capitalised template per class."""
    return encode_texts(heads.backbone, [first_pass_text(c) for c in classes], heads.ctx, show=False)


def _fudd_score(heads: "Heads", features: torch.Tensor, first: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
    key = ("fudd-captions", tuple(classes))
    if key not in heads._memo:
        texts = texts_of(heads.differential, classes)
        heads._memo[key] = dict(zip(texts, encode_texts(heads.backbone, texts, heads.ctx, show=len(texts) > 5000)))
    backbone = heads.backbone
    return fudd_logits(features, first, classes, heads.differential, heads._memo[key], backbone.logit_scale,
                       backbone.logit_bias, heads.inputs.fudd_top_k)


def _awt_explain(heads: "Heads", views: torch.Tensor, texts: torch.Tensor, classes: Sequence[str],
                 label: int) -> list[tuple[str, float]]:
    """Each of the class's AWT prompts with its share of the transport-weighted logit."""
    backbone = heads.backbone
    views = views if views.dim() == 2 else views.unsqueeze(0)
    shares = awt_shares(views, texts, backbone.logit_scale, backbone.logit_bias, heads.inputs.awt)[label]
    return list(zip(_awt_prompts(heads, classes[label]), shares.tolist()))


def _fudd_explain(heads: "Heads", image: torch.Tensor, first: torch.Tensor, classes: Sequence[str],
                  label: int) -> list[tuple[str, float]]:
    """The class's second-pass captions (against the image's other ambiguous classes), each with its cosine."""
    texts = second_pass_texts(heads.differential, classes, ambiguous_set(image, first, heads.inputs.fudd_top_k), label)
    feats = encode_texts(heads.backbone, texts, heads.ctx, show=False)
    return list(zip(texts, (feats @ image).tolist()))


def _protext_export(heads: "Heads", classes: Sequence[str]) -> dict:
    cfg = heads.inputs.prompts.config
    return {"template": _protext_template(heads), "templates": _protext_templates(heads), "blend": cfg.blend,
            "prompts_sha256": cfg.prompts_sha256, "n_ctx": cfg.n_ctx, "depth": cfg.depth}


HEADS: dict[str, Head] = {h.name: h for h in (
    Head("clip", "CLIP", "\"a photo of a {}.\" (the dataset's template with --dataset)", default=True,
         sentences=lambda heads, classes, name: [_clip_template(heads).format(name)],
         export=lambda heads, classes: {"templates": [_clip_template(heads)]}),
    Head("clip80", "CLIP-80", "the renormalised mean over CLIP's 80 ImageNet templates",
         sentences=lambda heads, classes, name: [t.format(name) for t in IMAGENET_80],
         export=lambda heads, classes: {"templates": list(IMAGENET_80)}),
    Head("dclip", "DCLIP", "DCLIP: \"{class}, which has {descriptor}\" per descriptor; the mean of the "
         "per-descriptor similarities", needs="descriptors", given_by="--descriptors FILE or dclip:NAME",
         sentences=_dclip, renormalize=False),
    Head("waffle", "WaffleCLIP", "WaffleCLIP: the same seeded random-word and random-character descriptors for "
         "every class, scored like dclip", given_by="--waffle-count, --waffle-seed, --waffle-concept",
         sentences=_waffle, renormalize=False),
    Head("cupl", "CuPL", "the renormalised mean over the class's LLM descriptions (classes without any use clip)",
         needs="descriptions", given_by="--descriptions FILE or cupl:NAME", default=True,
         sentences=lambda heads, classes, name: heads.descriptions.get(normalize_name(name)), fallback="clip"),
    Head("protext", "ProText", "the learned prompts with \"a photo of a {}.\" (with --cross-dataset, the "
         "dataset's ProText inference template; prompts set to --templates ensemble add CLIP's 7 ensemble "
         "templates, --blend mixes in the frozen encoder)", needs="prompts", given_by="--prompts DIR", default=True,
         encode=_protext, export=_protext_export),
    Head("awt", "AWT", "AWT: the image and 50 seeded augmented views against the class's template and first 50 "
         "descriptions, weighted by prediction entropy and matched by optimal transport", needs="descriptions",
         given_by="--descriptions FILE or awt:NAME", encode=_awt, score=_awt_score,
         views=lambda heads: heads.inputs.awt.views, explain=_awt_explain),
    Head("fudd", "FuDD", "FuDD: the first pass's 10 likeliest classes of each image scored again with LLM "
         "descriptions of how exactly they differ from each other", needs="differential",
         given_by="--differential FILE (from describe --differential)", encode=_fudd, score=_fudd_score,
         explain=_fudd_explain),
)}

# Combinations the reports add wherever their parts can run.
COMBINATIONS = ("protext+cupl",)


def head_names(spec: str) -> list[str]:
    """The heads a name stands for ("protext+cupl" -> both), each checked to exist."""
    parts = [p.strip() for p in spec.split("+")]
    for p in parts:
        if p not in HEADS:
            raise ProtextError(f"unknown head {p!r}; choose from {', '.join(HEADS)}, or join them with '+'")
    return parts


def method_name(spec: str) -> str:
    """A head's name in reports ("protext+cupl" -> "ProText+CuPL")."""
    return "+".join(HEADS[p].method for p in head_names(spec))


def runnable(spec: str, inputs: HeadInputs) -> bool:
    """Whether every part of a head has what it needs."""
    return all(inputs.has(HEADS[p].needs) for p in head_names(spec))


def default_heads(inputs: HeadInputs) -> list[str]:
    """What to run when no head is named: the default heads whose inputs are given; a classifier
    uses the last (protext with prompts, else cupl with descriptions, else clip)."""
    return [h.name for h in HEADS.values() if h.default and inputs.has(h.needs)]


def all_heads(inputs: HeadInputs) -> list[str]:
    """Every head and reported combination the inputs allow, in table order."""
    return [h for h in (*HEADS, *COMBINATIONS) if runnable(h, inputs)]


def table_order(names: Sequence[str]) -> list[str]:
    """`names` in the order of the heads table (heads, then the reported combinations, then others)."""
    known = [h for h in (*HEADS, *COMBINATIONS) if h in names]
    return known + [h for h in dict.fromkeys(names) if h not in known]


def choose_heads(spec: str | None, inputs: HeadInputs) -> list[str]:
    """The heads a comma-separated `spec` names, each checked; "all" is every head the inputs allow,
    None the default ones."""
    if spec is None:
        return default_heads(inputs)
    if spec.strip() == "all":
        return all_heads(inputs)
    names = [h.strip() for h in spec.split(",") if h.strip()]
    for name in names:
        head_names(name)
    return names


def explains(head: str) -> bool:
    """Whether a head has texts of its own to explain a label with (not protext, not a '+' combination)."""
    spec = HEADS.get(head.strip())
    return spec is not None and (spec.explain is not None or spec.sentences is not None)


def ensemble(features: torch.Tensor) -> torch.Tensor:
    """One class embedding from several: the renormalised mean of normalised features (CuPL, CLIP-80)."""
    return F.normalize(features.mean(0), dim=-1)


@dataclass
class Heads:
    """Builds and memoises class-embedding matrices for one backbone and one `HeadInputs`.

    `fallbacks[(head, classes)]` lists the classes a text head had no sentences for.
    """

    backbone: Backbone
    inputs: HeadInputs = HeadInputs()
    ctx: Context = Context()
    fallbacks: dict[tuple, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # AWT takes a class's first entries as they stand, blanks ("") included; the others skip blanks
        self.awt_descriptions = {normalize_name(k): list(v) for k, v in (self.inputs.descriptions or {}).items()}
        self.descriptions = {k: [s for s in v if s] for k, v in self.awt_descriptions.items()}
        self.descriptors = {normalize_name(k): list(v) for k, v in (self.inputs.descriptors or {}).items()}
        self.differential = symmetric(self.inputs.differential or {})
        self._memo: dict[tuple, torch.Tensor] = {}
        self._waffle_memo: dict[tuple, list[str]] = {}

    def waffle_descriptors(self, classes: Sequence[str]) -> list[str]:
        """The random descriptors every class of this label set shares (WaffleCLIP).

        Words come from the backbone's own vocabulary; characters from the descriptors or
        descriptions given, as WaffleCLIP draws them from its descriptor files, else from those words.
        """
        key = tuple(classes)
        if key not in self._waffle_memo:  # the head asks once per class; the tokenizer's vocabulary is large
            vocabulary = word_vocabulary(self.backbone.text.tokenizer)
            source = [s for v in (self.descriptors or self.descriptions).values() for s in v] or vocabulary
            waffle = self.inputs.waffle
            self._waffle_memo[key] = waffle_descriptors(classes, vocabulary, characters_of(source), waffle.count,
                                                        waffle.seed)
        return self._waffle_memo[key]

    def sentences_of(self, head: str, classes: Sequence[str]) -> list[str]:
        """Every sentence a text head encodes for `classes` (none for a prompt head)."""
        spec = HEADS[head]
        if spec.sentences is None:
            return []
        return [s for c in classes for s in (spec.sentences(self, classes, c) or [])]

    def export(self, head: str, classes: Sequence[str]) -> dict:
        """What each part of a head read, as an export records it."""
        parts = {}
        for part in head_names(head):
            spec = HEADS[part]
            if spec.export is not None:
                parts[part] = spec.export(self, classes)
            else:
                sentences = {c: list(spec.sentences(self, classes, c) or []) for c in classes}
                parts[part] = {"sentences": sum(map(len, sentences.values())),
                               "example": {classes[0]: sentences[classes[0]][:3]}}
        return {"parts": parts, "notes": self.fallback_notes()}

    def fallback_notes(self) -> list[str]:
        """One line per built head that gave some classes another head's embedding."""
        notes = []
        for (head, classes), missing in self.fallbacks.items():
            if missing:
                shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                notes.append(f"{head} head: no sentences for {len(missing)} of {len(classes)} classes, which use the "
                             f"{HEADS[head].fallback} head instead: {shown}")
        return notes

    def views(self, head: str) -> int:
        """Augmented views of each image (besides itself) the head scores; 0 for the cosine heads."""
        spec = HEADS.get(head.strip())
        return spec.views(self) if spec is not None and spec.views is not None else 0

    def logits(self, head: str, features: torch.Tensor, weights: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
        """Image-text logits of `features` ((N, d), or (N, 1 + views, d) for a head with views) against
        the head's class embeddings: scale · cosine plus SigLIP's bias, or the head's own rule."""
        spec, backbone = HEADS.get(head.strip()), self.backbone
        if spec is not None and spec.score is not None:
            if spec.views is not None and features.dim() == 2:
                features = features.unsqueeze(1)
            return spec.score(self, features, weights, classes)
        logits = backbone.logit_scale * features @ weights.T
        return logits if backbone.logit_bias is None else logits + backbone.logit_bias

    def explains(self, head: str) -> bool:
        return explains(head)

    def explain(self, head: str, features: torch.Tensor, weights: torch.Tensor, classes: Sequence[str],
                labels: Sequence[int], k: int = 3) -> list[list[tuple[str, float]]] | None:
        """For each image (`features` as for `logits`), the `k` texts of its label (`labels`, class
        indices) that weighed most: a sentence head's sentences by cosine with the image (DCLIP's
        explanation), AWT's prompts by their share of the logit, FuDD's captions by cosine. None for
        a head without texts of its own (protext, a '+' combination); [] for a class that fell back."""
        if not self.explains(head):
            return None
        spec, out = HEADS[head.strip()], []
        for image, label in zip(features, labels):
            if spec.explain is not None:
                found = spec.explain(self, image, weights, classes, label)
            else:
                texts = list(spec.sentences(self, classes, classes[label]) or [])
                image = image if image.dim() == 1 else image[0]
                scores = encode_texts(self.backbone, texts, self.ctx, show=False) @ image if texts else torch.empty(0)
                found = list(zip(texts, scores.tolist()))
            found.sort(key=lambda pair: -pair[1])
            out.append([(t, round(float(v), 4)) for t, v in found[:k]])
        return out

    def get(self, head: str, classes: Sequence[str]) -> torch.Tensor:
        key = (head, tuple(classes))
        if key not in self._memo:
            parts = head_names(head)
            if len(parts) > 1:
                scored = [p for p in parts if HEADS[p].score is not None]
                if scored:
                    raise ProtextError(f"head '{scored[0]}' scores images itself and cannot be joined with '+'")
                self._memo[key] = F.normalize(sum(self.get(p, classes) for p in parts), dim=-1)
            else:
                self._memo[key] = self._build(head, list(classes))
        return self._memo[key]

    def _templates(self, head: str) -> list[str]:
        """The texts a head wraps a class name in, "{}" for the name: what must fit in the context."""
        if head == "protext":
            cfg = self.inputs.prompts.config
            return [prompted_text(t, "{}", cfg.placeholder) for t in _protext_templates(self)]
        if head in ("clip", "clip80"):
            return [_clip_template(self)] if head == "clip" else list(IMAGENET_80)
        if head == "awt":
            return [awt_template(self.inputs.dataset) + "."]
        if head in ("waffle", "dclip"):  # the name comes first; a long descriptor is cut, never the name
            return [waffle_prefix(self.inputs.waffle.concept) + "{},"] if head == "waffle" else ["{},"]
        return []  # cupl: the descriptions, whatever names they hold (classes without any are checked as clip)

    def check_names(self, head: str, classes: Sequence[str]) -> None:
        """Refuse class names that would be cut to fit the text tower's context: two names that differ
        only past the cut would become one class."""
        templates = self._templates(head)
        if not templates:
            return
        text = self.backbone.text
        count = lambda t: len(text.tokenizer(text.clean(t))["input_ids"])  # noqa: E731 (special tokens included)
        overhead = max(count(t.format("x")) - count("x") + text.num_special_tokens for t in templates)
        names = text.tokenizer([text.clean(c) for c in classes], add_special_tokens=False)["input_ids"]
        over = [(c, len(ids)) for c, ids in zip(classes, names) if len(ids) + overhead > text.max_length]
        if over:
            shown = ", ".join(f"{c[:60]!r} ({n} tokens)" for c, n in over[:5]) + (
                f" and {len(over) - 5} more" if len(over) > 5 else "")
            raise ProtextError(f"{len(over)} class names are too long for the {text.max_length}-token context of "
                               f"'{self.backbone.name}' with head '{head}' (at most {text.max_length - overhead} tokens "
                               f"each): {shown}; shorten them, or they would be cut and could become the same class")

    def _build(self, head: str, classes: list[str]) -> torch.Tensor:
        spec = HEADS[head]
        if not self.inputs.has(spec.needs):
            raise ProtextError(f"head '{head}' needs {spec.needs} ({spec.given_by})")
        self.check_names(head, classes)
        if spec.encode is not None:
            return spec.encode(self, classes)
        sentences = {c: spec.sentences(self, classes, c) for c in classes}
        have = [c for c in classes if sentences[c]]
        missing = [c for c in classes if not sentences[c]]
        if missing and spec.fallback is None:
            shown = ", ".join(repr(c) for c in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ProtextError(f"head '{head}' needs {spec.needs or 'sentences'} ({spec.given_by}) for every class; "
                               f"none for {shown}")
        self.fallbacks[(head, tuple(classes))] = missing
        flat = [s for c in have for s in sentences[c]]
        feats = encode_texts(self.backbone, flat, self.ctx, show=len(flat) > 5000)
        rows: dict[str, torch.Tensor] = {}
        start = 0
        for c in have:
            part = feats[start : start + len(sentences[c])]
            rows[c] = ensemble(part) if spec.renormalize else part.mean(0)
            start += len(sentences[c])
        if missing:
            rows.update(zip(missing, self.get(spec.fallback, missing)))
        return torch.stack([rows[c] for c in classes])

"""An image-free check of learned prompts: classify held-out, name-masked descriptions.

Users without labelled images still want to know whether prompts learned anything. Here the
"images" are LLM descriptions the prompts never saw, with the class name replaced by a
neutral word ("A tench is a freshwater fish" -> "A thing is a freshwater fish"), encoded by
the frozen encoder. Each head (plain template, ProText prompts, description ensemble) is
scored by top-1 accuracy of cosine similarity, in the paper's two transfer settings:

- base-to-novel, one description set: prompts trained on the base classes' training
  descriptions; base = held-out descriptions of base classes, novel = every description of
  the novel classes (base/novel by CoOp's rule: the first ceil(n/2) labels are base);
- cross-dataset: prompts trained on one set (ImageNet), tested on every other set.

Both heads read the same text, so the only difference is the learned context: the
inference template of ProText's code for the protocol, "a photo of a {}." in base-to-novel and
the target dataset's ("a photo of a {}, a type of a texture." for DTD) in cross-dataset,
unless one template is given.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .backbone import Backbone
from .cache import atomic_write_bytes, atomic_write_json, sha1
from .datasets import split_base_novel
from .descriptions import load_descriptions, normalize_name
from .errors import ProtextError
from .features import encode_texts
from .heads import Heads, Waffle, ensemble
from .metrics import harmonic_mean, top1
from .model import ProText
from .sources import dataset_of, load_descriptors, resolve
from .templates import protext_template
from .train import TrainConfig, load_or_train, make_config

STOPWORDS = {"a", "an", "the", "of", "and", "or", "with", "in", "on", "for", "to", "at", "by", "from"}


def mask_class_name(sentence: str, name: str, word: str = "thing") -> str:
    """Replace the class name, then each of its words, by `word`.

    Plurals and possessives are caught, and for words of five letters or more any word they
    begin ("forest" -> "forested"), so the class cannot be read off the text.
    """
    def sub(pattern: str, text: str, suffix: str = r"(?:es|s|'s)?") -> str:
        return re.sub(rf"(?<![\w-]){pattern}{suffix}(?![\w-])", word, text, flags=re.IGNORECASE)

    words = [w for w in re.split(r"[\s_/]+", name) if w]
    out = sub(r"[\s_-]+".join(re.escape(w) for w in words), sentence)
    for w in words:
        if w.lower() not in STOPWORDS:
            out = sub(re.escape(w), out, r"[\w']*" if len(w) >= 5 else r"(?:es|s|'s)?")
    return re.sub(rf"\b{re.escape(word)}(?:[\s-]+{re.escape(word)}\b)+", word, out, flags=re.IGNORECASE)


def set_names(paths: Sequence[Path]) -> list[str]:
    """A distinct name per description file: its stem, with parent folders added where stems clash."""
    names = [p.stem for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        names = ["/".join(p.with_suffix("").parts[-depth:]) if names.count(n) > 1 else n for n, p in zip(names, paths)]
    if len(set(names)) < len(names):
        raise ProtextError(f"description files given twice: {', '.join(str(p) for p in paths)}")
    return names


def hold_out(data: Mapping[str, Sequence[str]], fraction: float, seed: int) -> tuple[dict, dict]:
    """Per class: a seeded `fraction` (at least one, never all) held out; the rest for training."""
    train_part, held = {}, {}
    for name, sentences in data.items():
        order = list(sentences)
        random.Random(f"{seed}:{name}").shuffle(order)
        k = min(max(1, round(fraction * len(order))), len(order) - 1)
        train_part[name], held[name] = order[k:], order[:k]
    return train_part, held


@dataclass
class Queries:
    """Masked descriptions with their labels, as the stand-in for test images."""

    texts: list[str]
    labels: torch.Tensor
    originals: list[str]


def make_queries(data: Mapping[str, Sequence[str]], classes: Sequence[str], mask_word: str) -> Queries:
    texts, labels, originals = [], [], []
    for i, name in enumerate(classes):
        for s in data[name]:
            texts.append(mask_class_name(s, name, mask_word))
            originals.append(s)
            labels.append(i)
    return Queries(texts, torch.tensor(labels), originals)


def check_base_to_novel(name: str, data: Mapping[str, Sequence[str]]) -> None:
    """Refuse a set that has no novel half, before any work starts."""
    if len(data) < 2:
        raise ProtextError(f"{name}: base-to-novel needs at least 2 classes (base and novel), it has {len(data)}")


class TextEvaluator:
    """Holds a backbone and the settings shared by both protocols."""

    def __init__(self, backbone: Backbone, cfg: TrainConfig, cache_dir: Path | None = None, template: str | None = None,
                 mask_word: str = "thing", show_progress: bool = False, work_dir: Path | None = None,
                 waffle: Waffle = Waffle(), descriptors: Mapping[str, Mapping[str, Sequence[str]]] | None = None):
        self.backbone = backbone
        self.cfg = replace(cfg, depth=min(cfg.depth, backbone.text.num_layers))
        self.cache_dir = cache_dir
        self.template = template
        self.mask_word = mask_word
        self.show_progress = show_progress
        self.work_dir = Path(work_dir) if work_dir else (Path(cache_dir or ".") / "eval-text-runs")
        self.waffle = waffle
        self.descriptors = {d: {normalize_name(k): list(v) for k, v in m.items()} for d, m in (descriptors or {}).items()}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_texts(self.backbone, list(texts), self.cache_dir, show_progress=self.show_progress)

    def train_prompts(self, data: Mapping[str, Sequence[str]]) -> ProText:
        """Train (or reuse the finished run for exactly these descriptions and settings)."""
        key = sha1(self.backbone.fingerprint(), self.backbone.text.text_rule, json.dumps(data),
                   json.dumps(asdict(self.cfg)))[:16]
        return load_or_train(self.backbone, data, self.cfg, self.work_dir / key, self.cache_dir, self.show_progress)

    def score(self, queries: Queries, classes: Sequence[str], model: ProText,
              train_data: Mapping[str, Sequence[str]] | None, template: str,
              dataset: str | None = None) -> dict[str, float]:
        """Top-1 of each head. clip and protext read `template`; cupl ensembles `train_data`;
        waffle is WaffleCLIP's; dclip runs when this dataset's descriptors cover every class."""
        q = self.encode(queries.texts)
        heads = {
            "clip": self.encode([template.format(c) for c in classes]),
            "protext": model.encode_classes(classes, template),
            "waffle": Heads(self.backbone, cache_dir=self.cache_dir, waffle=self.waffle).get("waffle", classes),
        }
        if train_data is not None:
            heads["cupl"] = torch.stack([ensemble(self.encode(train_data[c])) for c in classes])
        descriptors = self.descriptors.get(dataset or "")
        if descriptors and all(normalize_name(c) in descriptors for c in classes):
            heads["dclip"] = Heads(self.backbone, cache_dir=self.cache_dir, descriptors=descriptors).get(
                "dclip", classes, dataset)
        return {name: top1(q, queries.labels, w) for name, w in heads.items()}

    def base_to_novel(self, data: Mapping[str, Sequence[str]], holdout: float = 0.2, seed: int = 1,
                      name: str = "descriptions") -> dict:
        check_base_to_novel(name, data)
        classes = list(data)
        template = self.template or protext_template(None, cross_dataset=False)
        base, novel = split_base_novel(classes)
        train_part, held = hold_out({c: data[c] for c in base}, holdout, seed)
        model = self.train_prompts(train_part)
        base_q = make_queries(held, base, self.mask_word)
        novel_q = make_queries(data, novel, self.mask_word)
        dataset = dataset_of(name)
        b = self.score(base_q, base, model, train_part, template, dataset)
        n = self.score(novel_q, novel, model, None, template, dataset)
        n["cupl"] = n["clip"]  # no descriptions to train on for novel classes: CuPL falls back
        result = {"base": b, "novel": n, "hm": {h: harmonic_mean(b[h], n[h]) for h in b if h in n},
                  "classes": {"base": len(base), "novel": len(novel)},
                  "queries": {"base": len(base_q.texts), "novel": len(novel_q.texts)}, "template_text": template,
                  "examples": examples(novel_q, novel, 3)}
        return result

    def cross_dataset(self, source: Mapping[str, Sequence[str]], targets: Mapping[str, Mapping[str, Sequence[str]]]) -> dict:
        """Targets are keyed by set name ("cupl:dtd", "texture_prompts_full"), which picks the template."""
        model = self.train_prompts(source)
        out = {}
        for name, data in targets.items():
            classes = list(data)
            q = make_queries(data, classes, self.mask_word)
            template = self.template or protext_template(dataset_of(name), cross_dataset=True)
            out[name] = {**self.score(q, classes, model, None, template, dataset_of(name)), "classes": len(classes),
                         "queries": len(q.texts), "template_text": template, "examples": examples(q, classes, 2)}
        return out


def examples(q: Queries, classes: Sequence[str], k: int) -> list[dict]:
    """A few masked queries, evenly spread, so a person can see the task."""
    step = max(1, len(q.texts) // max(k, 1))
    return [{"class": classes[int(q.labels[i])], "original": q.originals[i], "masked": q.texts[i]}
            for i in range(0, len(q.texts), step)][:k]


HEAD_ORDER = ("clip", "cupl", "dclip", "waffle", "protext")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def markdown_base_to_novel(results: Mapping[str, dict]) -> str:
    """One row per set; a head a set could not run shows "–", and its mean is over the sets that ran it."""
    heads = [h for h in HEAD_ORDER if any(h in r["hm"] for r in results.values())]
    lines = ["| set | " + " | ".join(f"{h} base / novel / HM" for h in heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for name, r in results.items():
        cells = [" / ".join(f"{r[g][h]:.1f}" for g in ("base", "novel", "hm")) if h in r["hm"] else "–" for h in heads]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    means = [" / ".join(f"{_mean([r[g][h] for r in results.values() if h in r['hm']]):.1f}"
                        for g in ("base", "novel", "hm")) for h in heads]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines)


def markdown_cross(results: Mapping[str, dict]) -> str:
    heads = [h for h in HEAD_ORDER if any(h in r for r in results.values())]
    lines = ["| target set | " + " | ".join(heads) + " | template text |", "|---" * (len(heads) + 2) + "|"]
    for name, r in results.items():
        cells = [f"{r[h]:.1f}" if h in r else "–" for h in heads]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r.get('template_text', '')} |")
    means = [f"{_mean([r[h] for r in results.values() if h in r]):.1f}" for h in heads]
    lines.append("| **mean** | " + " | ".join(means) + " | |")
    return "\n".join(lines)


PROTOCOLS = ("base2novel", "cross-dataset", "both")


def load_sets(specs: Sequence[str], protocol: str = "both", cache_dir: Path | None = None) -> dict[str, dict]:
    """Description sets by distinct name (see `set_names`), each checked for `protocol` before any work."""
    if protocol not in PROTOCOLS:
        raise ProtextError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    paths = [resolve(spec, cache_dir) for spec in specs]
    sets = {name: {"path": path, "data": load_descriptions(path)} for name, path in zip(set_names(paths), paths)}
    if protocol != "cross-dataset":
        for name, entry in sets.items():
            check_base_to_novel(name, entry["data"])
    return sets


def run(backbone: Backbone, sets: Mapping[str, dict], out: Path, protocol: str = "both", source: str = "cupl:imagenet",
        holdout: float = 0.2, seed: int = 1, mask_word: str = "thing", template: str | None = None,
        config_file: Path | None = None, overrides: Mapping | None = None, cache_dir: Path | None = None,
        show_progress: bool = True, descriptors: Sequence[str] = (), waffle: Waffle = Waffle()) -> tuple[dict, str]:
    """The image-free check of `sets` (from `load_sets`); writes eval_text.json and eval_text.md to `out`
    and returns the report and its Markdown. Settings: each protocol's preset, then `config_file`, then
    `overrides`; trained prompts are kept under `out/runs`, so a rerun reuses them. `descriptors`
    (DCLIP files or dclip:NAME sets) give the dclip head to the sets of the same dataset."""
    if not 0 < holdout < 1:
        raise ProtextError(f"holdout must be between 0 and 1, got {holdout}")
    report: dict = {"backbone": backbone.name, "holdout": holdout, "seed": seed, "mask_word": mask_word}
    md: list[str] = []

    by_dataset = {}
    for spec in descriptors:
        dataset = dataset_of(spec)
        if dataset is None:
            raise ProtextError(f"{spec}: cannot tell which dataset these descriptors belong to; name the file after "
                               f"it (e.g. dtd.json or descriptors_dtd.json)")
        by_dataset[dataset] = load_descriptors(spec, cache_dir)

    def evaluator(preset: str) -> TextEvaluator:
        return TextEvaluator(backbone, make_config(preset, config_file, overrides), cache_dir, template, mask_word,
                             show_progress, Path(out) / "runs", waffle, by_dataset)

    if protocol in ("base2novel", "both"):
        ev = evaluator("base2novel")
        report["base2novel"] = {name: ev.base_to_novel(e["data"], holdout, seed, name) for name, e in sets.items()}
        text = next(iter(report["base2novel"].values()))["template_text"]
        md += ["## Base-to-novel (top-1 %, masked held-out descriptions)", "",
               f"The clip and protext heads read \"{text}\".", "", markdown_base_to_novel(report["base2novel"]), ""]
    if protocol in ("cross-dataset", "both"):
        source_path = resolve(source, cache_dir)
        targets = {n: e["data"] for n, e in sets.items() if e["path"].resolve() != source_path.resolve()}
        report["cross_dataset"] = evaluator("cross-dataset").cross_dataset(load_descriptions(source_path), targets)
        md += [f"## Cross-dataset (prompts trained on {source_path.stem}; top-1 %)", "",
               markdown_cross(report["cross_dataset"]), ""]
    md += ["## Masked examples", ""]
    for name, r in report.get("base2novel", report.get("cross_dataset", {})).items():
        md += [f"- {name} / {e['class']}: {e['masked']}" for e in r["examples"][:2]]
    markdown = "\n".join(md) + "\n"
    atomic_write_json(Path(out) / "eval_text.json", report)
    atomic_write_bytes(Path(out) / "eval_text.md", markdown.encode())
    return report, markdown

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

from ..backbone import Backbone
from ..cache import atomic_write_bytes, atomic_write_json, sha1
from ..context import Context
from ..descriptions import load_descriptions, normalize_name
from ..errors import ProtextError
from ..feature_cache import encode_texts
from ..flags import option
from ..heads import Heads, HeadInputs, Waffle, all_heads, table_order
from ..metrics import accuracy, harmonic_mean, hits
from ..model import INFERENCE, ProText
from ..sources import dataset_of, load_descriptors, resolve
from ..templates import protext_template
from . import report as rp
from .datasets import split_base_novel
from .train import TrainConfig, load_or_train, make_config

# Training settings added after runs were first kept under their settings' hash: at their default
# they stay out of the hash, so those runs are found again.
LATER_DEFAULTS = {"deep_init": "random"}

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


@dataclass
class TextCheckSettings:
    """The image-free check's own settings; each field is a flag of `eval-text`."""

    protocol: str = option("both", "base2novel, cross-dataset or both", choices=("base2novel", "cross-dataset", "both"))
    source: str = option("cupl:imagenet", "cross-dataset: the set prompts are trained on")
    holdout: float = option(0.2, "base2novel: share of each base class's descriptions held out")
    holdout_seed: int = option(1, "seed of the hold-out split")
    mask_word: str = option("thing", "word that replaces the class name")
    waffle_seeds: int = option(7, "WaffleCLIP is the mean over this many seeds, as in its paper")
    inference_template: str | None = option(None, "template of both the clip and protext heads (default: as "
                                                  "ProText's code, 'a photo of a {}.' in base2novel and the target "
                                                  "dataset's inference template in cross-dataset, the dataset known "
                                                  "from the set name, e.g. cupl:dtd or texture_prompts_full.json)")

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ProtextError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not 0 < self.holdout < 1:
            raise ProtextError(f"holdout must be between 0 and 1, got {self.holdout}")
        if self.waffle_seeds < 1:
            raise ProtextError(f"--waffle-seeds must be at least 1, got {self.waffle_seeds}")


class TextEvaluator:
    """Holds a backbone and the settings shared by both protocols."""

    def __init__(self, backbone: Backbone, cfg: TrainConfig, ctx: Context = Context(), template: str | None = None,
                 mask_word: str = "thing", work_dir: Path | None = None, waffle: Waffle = Waffle(),
                 descriptors: Mapping[str, Mapping[str, Sequence[str]]] | None = None, waffle_seeds: int = 1,
                 variants: Mapping[str, Mapping] | None = None):
        """`variants`: more protext columns, name -> inference settings (`model.INFERENCE` fields) the
        same trained prompts are scored with (an ablation costs no training)."""
        self.backbone = backbone
        self.variants = dict(variants or {})
        self.cfg = replace(cfg, depth=min(cfg.depth, backbone.text.num_layers))
        self.ctx = ctx
        self.template = template
        self.mask_word = mask_word
        self.work_dir = Path(work_dir) if work_dir else ctx.cache / "eval-text-runs"
        self.waffle, self.waffle_seeds = waffle, waffle_seeds
        self.descriptors = {d: {normalize_name(k): list(v) for k, v in m.items()} for d, m in (descriptors or {}).items()}
        self.not_run: dict[str, str] = {}
        # per query, 1 where a head's top-1 is right (WaffleCLIP: the share of its seeds that are), keyed by
        # "{where}/{split}" then head, and each query's class under "labels": what a paired interval of two
        # heads' difference is drawn from
        self.hits: dict[str, dict[str, torch.Tensor]] = {}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_texts(self.backbone, list(texts), self.ctx)

    def train_prompts(self, data: Mapping[str, Sequence[str]]) -> ProText:
        """Train (or reuse the finished run for exactly these descriptions and settings)."""
        training = {k: v for k, v in asdict(self.cfg).items() if k not in INFERENCE}  # one run for any of those
        for k, default in LATER_DEFAULTS.items():  # runs kept before a setting existed keep their folder
            if training.get(k) == default:
                del training[k]
        key = sha1(self.backbone.fingerprint(), self.backbone.text.text_rule, json.dumps(data),
                   json.dumps(training))[:16]
        return load_or_train(self.backbone, data, self.cfg, self.work_dir / key, self.ctx)

    def score(self, queries: Queries, classes: Sequence[str], model: ProText,
              train_data: Mapping[str, Sequence[str]] | None, template: str, dataset: str | None,
              where: str, split: str = "test") -> dict[str, float]:
        """Top-1 of every head the inputs allow: clip and protext read `template`, cupl ensembles
        `train_data`, dclip runs when this dataset's descriptors cover every class, waffle is the
        mean over `waffle_seeds` seeds (its characters from the descriptors or descriptions given)."""
        q = self.encode(queries.texts)
        inputs = HeadInputs(model, train_data, self.descriptors.get(dataset or ""), self.waffle, dataset,
                            template=template)
        heads = Heads(self.backbone, inputs, self.ctx)
        out: dict[str, float] = {}
        right: dict[str, torch.Tensor] = {}
        for name in all_heads(inputs):
            try:
                if name == "waffle":
                    seeds = [replace(self.waffle, seed=self.waffle.seed + k) for k in range(self.waffle_seeds)]
                    per_seed = [hits(q, queries.labels, Heads(self.backbone, replace(inputs, waffle=w), self.ctx)
                                     .get("waffle", classes)) for w in seeds]
                    out[name] = sum(accuracy(h) for h in per_seed) / len(seeds)
                    right[name] = torch.stack(per_seed).double().mean(0)
                    continue
                weights = heads.get(name, classes)
            except ProtextError as e:  # a head without data for these classes is not run, never replaced
                self.not_run[f"{where}/{name}"] = str(e)
                continue
            if heads.views(name):  # a query is one text: a head of views sees it as one view
                right[name] = heads.logits(name, q.unsqueeze(1), weights, classes).argmax(1) == queries.labels
                out[name] = 100.0 * int(right[name].sum()) / max(1, len(queries.labels))
            else:
                right[name] = hits(q, queries.labels, weights)
                out[name] = accuracy(right[name])
        for name, settings in self.variants.items():
            used = replace(inputs, prompts=model.used_with(**settings))
            right[name] = hits(q, queries.labels, Heads(self.backbone, used, self.ctx).get("protext", classes))
            out[name] = accuracy(right[name])
        self.hits[f"{where}/{split}"] = {**right, "labels": queries.labels}
        return out

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
        b = self.score(base_q, base, model, train_part, template, dataset, f"base2novel/{name}", "base")
        n = self.score(novel_q, novel, model, train_part, template, dataset, f"base2novel/{name}", "novel")
        return {"base": b, "novel": n, "hm": {h: harmonic_mean(b[h], n[h]) for h in b if h in n},
                "classes": {"base": len(base), "novel": len(novel)},
                "queries": {"base": len(base_q.texts), "novel": len(novel_q.texts)}, "template_text": template,
                "examples": examples(novel_q, novel, 3), "prompts": model.config.prompts_sha256}

    def cross_dataset(self, source: Mapping[str, Sequence[str]], targets: Mapping[str, Mapping[str, Sequence[str]]]) -> dict:
        """Targets are keyed by set name ("cupl:dtd", "texture_prompts_full"), which picks the template."""
        model = self.train_prompts(source)
        out = {}
        for name, data in targets.items():
            classes = list(data)
            q = make_queries(data, classes, self.mask_word)
            template = self.template or protext_template(dataset_of(name), cross_dataset=True)
            out[name] = {"scores": self.score(q, classes, model, None, template, dataset_of(name),
                                              f"cross-dataset/{name}"),
                         "classes": len(classes), "queries": len(q.texts), "template_text": template,
                         "examples": examples(q, classes, 2), "prompts": model.config.prompts_sha256}
        return out


def examples(q: Queries, classes: Sequence[str], k: int) -> list[dict]:
    """A few masked queries, evenly spread, so a person can see the task."""
    step = max(1, len(q.texts) // max(k, 1))
    return [{"class": classes[int(q.labels[i])], "original": q.originals[i], "masked": q.texts[i]}
            for i in range(0, len(q.texts), step)][:k]


PROTOCOLS = ("base2novel", "cross-dataset", "both")


def result_rows(report: dict) -> list[dict]:
    """The flat rows (`report.row`) of both protocols' results."""
    rows, backbone = [], report["backbone"]
    for name, r in report["sets"].get("base2novel", {}).items():
        for split in ("base", "novel"):
            rows += [rp.row("base2novel", name, split, h, "top1", v, backbone=backbone,
                            prompts=r["prompts"] if "protext" in h else None) for h, v in r.pop(split).items()]
        rows += [rp.row("base2novel", name, "all", h, "hm", v, backbone=backbone,
                        prompts=r["prompts"] if "protext" in h else None) for h, v in r.pop("hm").items()]
    for name, r in report["sets"].get("cross-dataset", {}).items():
        rows += [rp.row("cross-dataset", name, "test", h, "top1", v, backbone=backbone,
                        prompts=r["prompts"] if "protext" in h else None) for h, v in r.pop("scores").items()]
    return rows


def markdown_base_to_novel(rows: Sequence[dict]) -> str:
    """One line per set; a head a set could not run shows "–", and its mean is over the sets that ran it."""
    rows = [r for r in rows if r["protocol"] == "base2novel"]
    heads = table_order([r["head"] for r in rows])
    sets = list(dict.fromkeys(r["dataset"] for r in rows))

    def cell(values: Sequence[float | None]) -> str:
        return "–" if all(v is None for v in values) else " / ".join(rp.number(v, 1) for v in values)

    splits = ("base", "novel", "all")
    table = [[s, *[cell([rp.value(rows, dataset=s, split=g, head=h) for g in splits]) for h in heads]] for s in sets]
    table.append(["**mean**", *[cell([rp.mean([rp.value(rows, dataset=s, split=g, head=h) for s in sets])
                                      for g in splits]) for h in heads]])
    return "\n".join(rp.markdown(["set", *[f"{h} base / novel / HM" for h in heads]], table))


def markdown_cross(rows: Sequence[dict], sets: Mapping[str, dict]) -> str:
    rows = [r for r in rows if r["protocol"] == "cross-dataset"]
    heads = table_order([r["head"] for r in rows])
    table = [[s, *[rp.number(rp.value(rows, dataset=s, head=h), 1) for h in heads], sets[s]["template_text"]]
             for s in sets]
    table.append(["**mean**", *[rp.number(rp.mean([rp.value(rows, dataset=s, head=h) for s in sets]), 1)
                                for h in heads], ""])
    return "\n".join(rp.markdown(["target set", *heads, "template text"], table))


def load_sets(specs: Sequence[str], protocol: str = "both", ctx: Context = Context()) -> dict[str, dict]:
    """Description sets by distinct name (see `set_names`), each checked for `protocol` before any work."""
    if protocol not in PROTOCOLS:
        raise ProtextError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    paths = [resolve(spec, ctx, "cupl:") for spec in specs]
    sets = {name: {"path": path, "data": load_descriptions(path)} for name, path in zip(set_names(paths), paths)}
    if protocol != "cross-dataset":
        for name, entry in sets.items():
            check_base_to_novel(name, entry["data"])
    return sets


def run(backbone: Backbone, sets: Mapping[str, dict], out: Path, settings: TextCheckSettings = TextCheckSettings(),
        descriptors: Sequence[str] = (), waffle: Waffle = Waffle(), config_file: Path | None = None,
        overrides: Mapping | None = None, ctx: Context = Context()) -> tuple[dict, str]:
    """The image-free check of `sets` (from `load_sets`); writes eval_text.json, eval_text.csv and
    eval_text.md to `out` and returns the report and its Markdown. Training settings: each
    protocol's preset, then `config_file`, then `overrides`; trained prompts are kept under
    `out/runs`, so a rerun reuses them. `descriptors` (DCLIP files or dclip:NAME sets) give the
    dclip head to the sets of the same dataset."""
    report: dict = {"backbone": backbone.name, "settings": asdict(settings), "sets": {}}
    md: list[str] = []
    by_dataset = {}
    for spec in descriptors:
        dataset = dataset_of(spec)
        if dataset is None:
            raise ProtextError(f"{spec}: cannot tell which dataset these descriptors belong to; name the file after "
                               f"it (e.g. dtd.json or descriptors_dtd.json)")
        by_dataset[dataset] = load_descriptors(spec, ctx)

    def evaluator(preset: str) -> TextEvaluator:
        return TextEvaluator(backbone, make_config(preset, config_file, overrides), ctx, settings.inference_template,
                             settings.mask_word, Path(out) / "runs", waffle, by_dataset, settings.waffle_seeds)

    not_run: dict[str, str] = {}
    if settings.protocol in ("base2novel", "both"):
        ev = evaluator("base2novel")
        report["sets"]["base2novel"] = {name: ev.base_to_novel(e["data"], settings.holdout, settings.holdout_seed, name)
                                        for name, e in sets.items()}
        not_run.update(ev.not_run)
    if settings.protocol in ("cross-dataset", "both"):
        source_path = resolve(settings.source, ctx, "cupl:")
        targets = {n: e["data"] for n, e in sets.items() if e["path"].resolve() != source_path.resolve()}
        ev = evaluator("cross-dataset")
        report["sets"]["cross-dataset"] = ev.cross_dataset(load_descriptions(source_path), targets)
        report["source"] = source_path.stem
        not_run.update(ev.not_run)
    report["rows"] = result_rows(report)
    report["not_run"] = not_run
    if "base2novel" in report["sets"]:
        text = next(iter(report["sets"]["base2novel"].values()))["template_text"]
        md += ["## Base-to-novel (top-1 %, masked held-out descriptions)", "",
               f"The clip and protext heads read \"{text}\".", "", markdown_base_to_novel(report["rows"]), ""]
    if "cross-dataset" in report["sets"]:
        md += [f"## Cross-dataset (prompts trained on {report['source']}; top-1 %)", "",
               markdown_cross(report["rows"], report["sets"]["cross-dataset"]), ""]
    md += ["## Masked examples", ""]
    first = report["sets"].get("base2novel", report["sets"].get("cross-dataset", {}))
    for name, r in first.items():
        md += [f"- {name} / {e['class']}: {e['masked']}" for e in r["examples"][:2]]
    markdown = "\n".join(md) + "\n"
    atomic_write_json(Path(out) / "eval_text.json", report)
    atomic_write_bytes(Path(out) / "eval_text.csv", rp.to_csv(report["rows"]))
    atomic_write_bytes(Path(out) / "eval_text.md", markdown.encode())
    return report, markdown

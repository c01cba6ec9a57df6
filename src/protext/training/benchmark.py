"""The paper's four image protocols, each one call, each writing flat rows, a table and a chart.

- cross-dataset:          prompts trained on ImageNet descriptions, tested on ImageNet and 10 others;
- base2novel:             per dataset, prompts trained on the base classes' descriptions,
                          tested on base and novel classes (HM);
- domain-generalization:  the ImageNet prompts on ImageNetV2, -Sketch, -A, -R;
- text-only:              per dataset, prompts trained on all its classes' descriptions, beside every
                          other text-only head.

A dataset missing under the data root is reported (with what was expected where) and the
others still run; a head without data for a dataset is reported as not run, never replaced by
another. Image features and trained prompts are cached, so a rerun only does what is new. The
results are `report` rows (one number each), with the paper's numbers as rows of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .. import paper
from ..backbone import Backbone
from ..cache import atomic_write_bytes, atomic_write_json
from ..context import Context
from ..descriptions import load_descriptions, select_classes
from ..errors import ProtextError
from ..flags import option
from ..heads import COMBINATIONS, HEADS, Heads, HeadInputs, Waffle, all_heads, default_heads, method_name, table_order
from ..metrics import harmonic_mean
from ..model import ProText
from ..sources import SOURCES, fetch, load_descriptors
from . import report as rp
from .datasets import CROSS_DATASET_TARGETS, DOMAIN_SHIFTS, Dataset, base_novel, load_dataset
from .evaluate import accuracy, evaluate, extract
from .train import load_or_train, make_config

B2N_DATASETS = ("imagenet", *CROSS_DATASET_TARGETS)
# Each protocol trains with the paper's training preset for it.
PROTOCOL_PRESET = {"cross-dataset": "cross-dataset", "domain-generalization": "imagenet-200ep",
                   "base2novel": "base2novel", "text-only": "text-only"}


@dataclass
class BenchmarkSettings:
    """What a protocol reads besides the data root and the backbone; each field is a flag of `benchmark`."""

    datasets: str | None = option(None, "comma-separated subset of datasets to run")
    prompts_dir: Path | None = option(None, "base2novel / text-only: per-dataset prompt folders (trained there when "
                                            "absent; default: <out>/prompts)")
    descriptions_dir: Path | None = option(None, "<dataset>.json description files (default: the public CuPL sets)")
    descriptors_dir: Path | None = option(None, "text-only: <dataset>.json DCLIP descriptor files (default: the "
                                                "public DCLIP sets)")
    waffle_seeds: int = option(7, "text-only: WaffleCLIP is the mean over this many seeds, as in its paper")
    awt_dir: Path | None = option(None, "text-only: <dataset>.json description files for the awt head (default: "
                                        "AWT's own public sets, awt:NAME)")

    def names(self, default: Sequence[str]) -> list[str]:
        return [d.strip() for d in self.datasets.split(",") if d.strip()] if self.datasets else list(default)


class Results:
    """The rows of one protocol run, what each dataset held, and what could not run."""

    def __init__(self, protocol: str, backbone: Backbone, prompts: ProText | None = None):
        self.protocol, self.backbone = protocol, backbone.name
        self.prompts = prompts.config.prompts_sha256 if prompts is not None else None
        self.rows: list[dict] = []
        self.datasets: dict[str, dict] = {}
        self.missing: dict[str, str] = {}
        self.not_run: dict[str, str] = {}
        self.extra: dict = {}

    def add(self, dataset: str, split: str, head: str, metric: str, value: float, source: str = "measured") -> None:
        prompts = self.prompts if "protext" in head.split("+") and source == "measured" else None
        self.rows.append(rp.row(self.protocol, dataset, split, head, metric, value, source, self.backbone, prompts))

    def add_paper(self, numbers: Mapping[str, Mapping[str, float] | float], split: str = "test",
                  metric: str = "top1") -> None:
        """Published numbers as {head: {dataset: value}}."""
        for head, per_dataset in numbers.items():
            for dataset, v in per_dataset.items():
                if v is not None:
                    self.add(dataset, split, head, metric, v, "paper")

    def dataset_row(self, row: dict) -> None:
        self.datasets[row["dataset"]] = {k: row[k] for k in ("split", "classes", "images", "skipped",
                                                              "skipped_files", "notes")}

    def each(self, names: Sequence[str], run: Callable[[str], None]) -> None:
        for name in names:
            try:
                run(name)
            except ProtextError as e:
                self.missing[name] = str(e)

    def as_dict(self) -> dict:
        return {"protocol": self.protocol, "backbone": self.backbone, "prompts": self.prompts, "rows": self.rows,
                "datasets": self.datasets, "missing": self.missing, "not_run": self.not_run, **self.extra}


def run(protocol: str, backbone: Backbone, data_root: Path, out: Path, prompts: ProText | None = None,
        settings: BenchmarkSettings = BenchmarkSettings(), config_file: Path | None = None,
        overrides: Mapping | None = None, ctx: Context = Context()) -> tuple[dict, dict[str, Path]]:
    """Run one protocol and write its report to `out`; returns the report and the files written.

    Without `prompts`, cross-dataset and domain generalisation train ImageNet prompts into
    `out/prompts-<preset>` (or reuse them there); base2novel and text-only train one prompt set
    per dataset into `settings.prompts_dir` (default `out/prompts`). Training settings: the
    protocol's preset, then `config_file`, then `overrides`.
    """
    if protocol not in PROTOCOL_PRESET:
        raise ProtextError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOL_PRESET)}")
    if settings.waffle_seeds < 1:
        raise ProtextError(f"--waffle-seeds must be at least 1, got {settings.waffle_seeds}")
    cfg = make_config(PROTOCOL_PRESET[protocol], config_file, overrides)
    out = Path(out)
    prompts_dir = settings.prompts_dir or out / "prompts"
    if protocol in ("cross-dataset", "domain-generalization"):
        if prompts is None:
            prompts = load_or_train(backbone, lambda: load_descriptions(fetch("cupl:imagenet", ctx)), cfg,
                                    out / f"prompts-{PROTOCOL_PRESET[protocol]}", ctx, source="cupl:imagenet")
        if protocol == "cross-dataset":
            result = cross_dataset(backbone, prompts, data_root, settings.names(("imagenet", *CROSS_DATASET_TARGETS)),
                                   ctx)
        else:
            result = domain_generalization(backbone, prompts, data_root, ctx)
    else:
        per_dataset = base_to_novel if protocol == "base2novel" else text_only
        result = per_dataset(backbone, data_root, prompts_dir, cfg, settings, ctx)
    return result.as_dict(), write_report(result.as_dict(), out)


def descriptions_for(dataset: str, descriptions_dir: Path | None, ctx: Context) -> dict | None:
    """`<descriptions_dir>/<dataset>.json`, else the public CuPL set of that name, else None."""
    if descriptions_dir is not None and (Path(descriptions_dir) / f"{dataset}.json").is_file():
        return load_descriptions(Path(descriptions_dir) / f"{dataset}.json")
    if f"cupl:{dataset}" in SOURCES:
        return load_descriptions(fetch(f"cupl:{dataset}", ctx))
    return None


def descriptors_for(dataset: str, descriptors_dir: Path | None, ctx: Context) -> dict | None:
    """`<descriptors_dir>/<dataset>.json`, else the public DCLIP set of that name, else None."""
    if descriptors_dir is not None and (Path(descriptors_dir) / f"{dataset}.json").is_file():
        return load_descriptors(str(Path(descriptors_dir) / f"{dataset}.json"))
    if f"dclip:{dataset}" in SOURCES:
        return load_descriptors(f"dclip:{dataset}", ctx)
    return None


def awt_descriptions_for(dataset: str, awt_dir: Path | None, ctx: Context) -> dict | None:
    """`<awt_dir>/<dataset>.json`, else AWT's own public set of that name, else None; blanks kept,
    as AWT counts them."""
    if awt_dir is not None and (Path(awt_dir) / f"{dataset}.json").is_file():
        return load_descriptions(Path(awt_dir) / f"{dataset}.json", keep_blank=True)
    if f"awt:{dataset}" in SOURCES:
        return load_descriptions(fetch(f"awt:{dataset}", ctx), keep_blank=True)
    return None


def prompts_descriptions(prompts: ProText, ctx: Context) -> dict | None:
    """The ImageNet descriptions the cross-dataset prompts were trained on, for the CuPL head."""
    source = prompts.config.training.get("source")
    if source in SOURCES:
        return load_descriptions(fetch(source, ctx))
    if source and Path(source).is_file():
        return load_descriptions(source)
    return None


def _score(results: Results, backbone: Backbone, dataset: Dataset, inputs: HeadInputs, heads: Sequence[str],
           ctx: Context, split: str = "test") -> dict:
    row = evaluate(backbone, dataset, Heads(backbone, replace(inputs, dataset=dataset.name), ctx), heads, ctx)
    for head in heads:
        results.add(dataset.name, split, head, "top1", row[head])
    return row


def _transfer(protocol: str, backbone: Backbone, prompts: ProText, data_root: Path, names: Sequence[str],
              ctx: Context, cross: bool) -> Results:
    results = Results(protocol, backbone, prompts)
    inputs = HeadInputs(prompts, prompts_descriptions(prompts, ctx), cross_dataset=cross)
    heads = default_heads(inputs)
    if "cupl" not in heads:
        results.not_run["cupl"] = "the descriptions the prompts were trained on are not on this machine"
    results.each(names, lambda d: results.dataset_row(_score(results, backbone, load_dataset(d, data_root), inputs,
                                                             heads, ctx)))
    return results


def cross_dataset(backbone: Backbone, prompts: ProText, data_root: Path,
                  datasets: Sequence[str] = ("imagenet", *CROSS_DATASET_TARGETS), ctx: Context = Context()) -> Results:
    results = _transfer("cross-dataset", backbone, prompts, data_root, datasets, ctx, cross=True)
    results.add_paper({"protext": paper.CROSS_DATASET_PROTEXT})
    results.add_paper({h: {"mean": v} for h, v in paper.CROSS_DATASET_MEAN.items()})
    return results


def domain_generalization(backbone: Backbone, prompts: ProText, data_root: Path, ctx: Context = Context()) -> Results:
    results = _transfer("domain-generalization", backbone, prompts, data_root, DOMAIN_SHIFTS, ctx, cross=False)
    results.add_paper(paper.DOMAIN_GENERALIZATION)
    results.add_paper({h: {"mean": v} for h, v in paper.DOMAIN_GENERALIZATION_MEAN.items()})
    return results


def _descriptions(name: str, ds: Dataset, settings: BenchmarkSettings, ctx: Context) -> dict:
    data = descriptions_for(name, settings.descriptions_dir, ctx)
    if data is None:
        raise ProtextError(f"no descriptions for {name}: expected "
                           f"{settings.descriptions_dir or '<--descriptions-dir>'}/{name}.json")
    return data


def base_to_novel(backbone: Backbone, data_root: Path, prompts_dir: Path, cfg, settings: BenchmarkSettings,
                  ctx: Context = Context()) -> Results:
    results = Results("base2novel", backbone)

    def run_one(name: str) -> None:
        full = load_dataset(name, data_root)
        name = full.name  # an hf: dataset goes by its short name
        data = _descriptions(name, full, settings, ctx)
        base, novel = base_novel(full, "base"), base_novel(full, "novel")
        base_data = select_classes(data, base.classes, name)
        prompts = load_or_train(backbone, base_data, cfg, Path(prompts_dir) / name, ctx)
        results.prompts = prompts.config.prompts_sha256
        inputs = HeadInputs(prompts, base_data)  # novel classes have no descriptions: CuPL falls back
        heads = default_heads(inputs)
        b = _score(results, backbone, base, inputs, heads, ctx, "base")
        n = _score(results, backbone, novel, inputs, heads, ctx, "novel")
        for head in heads:
            results.add(name, "all", head, "hm", harmonic_mean(b[head], n[head]))
        results.datasets[name] = {"images": b["images"] + n["images"], "skipped": b["skipped"] + n["skipped"],
                                  "skipped_files": (b["skipped_files"] + n["skipped_files"])[:50],
                                  "notes": b["notes"], "classes": b["classes"] + n["classes"]}

    results.each(settings.names(B2N_DATASETS), run_one)
    for head, (b, n, hm) in paper.BASE2NOVEL_MEAN.items():
        for split, metric, v in (("base", "top1", b), ("novel", "top1", n), ("all", "hm", hm)):
            results.add("mean", split, head, metric, v, "paper")
    return results


def text_only(backbone: Backbone, data_root: Path, prompts_dir: Path, cfg, settings: BenchmarkSettings,
              ctx: Context = Context()) -> Results:
    """Every text-only head of the paper's ImageNet table on each dataset. WaffleCLIP is the mean
    over `waffle_seeds` seeds, as its paper reports it; a head without data for a dataset (DCLIP
    descriptors) is listed under `not_run`, never replaced by another."""
    results = Results("text-only", backbone)
    results.extra["waffle_seeds"] = settings.waffle_seeds

    def run_one(name: str) -> None:
        ds = load_dataset(name, data_root)
        name = ds.name  # an hf: dataset goes by its short name
        data = select_classes(_descriptions(name, ds, settings, ctx), ds.classes, name)
        prompts = load_or_train(backbone, data, cfg, Path(prompts_dir) / name, ctx)
        results.prompts = prompts.config.prompts_sha256
        try:
            descriptors = descriptors_for(name, settings.descriptors_dir, ctx)
            descriptors = select_classes(descriptors, ds.classes, f"dclip ({name})", "descriptor") if descriptors else None
            if descriptors is None:
                results.not_run[f"{name}/dclip"] = f"no DCLIP descriptors for {name}"
        except ProtextError as e:  # no file, no download, or classes it lacks: this head is not run
            descriptors = None
            results.not_run[f"{name}/dclip"] = str(e)
        inputs = HeadInputs(prompts, data, descriptors, dataset=name)
        heads = all_heads(inputs)
        row = _score(results, backbone, ds, inputs, [h for h in heads if h not in ("waffle", "awt")], ctx)
        results.dataset_row(row)
        try:  # AWT with its own descriptions, as its paper reports it
            awt = awt_descriptions_for(name, settings.awt_dir, ctx)
            awt = select_classes(awt, ds.classes, f"awt ({name})") if awt else None
            if awt is None:
                results.not_run[f"{name}/awt"] = f"no AWT descriptions for {name}"
            else:
                _score(results, backbone, ds, replace(inputs, descriptions=awt), ["awt"], ctx)
        except ProtextError as e:
            results.not_run[f"{name}/awt"] = str(e)
        feats = extract(backbone, ds, ctx)  # from the cache evaluate just filled
        waffle = sum(accuracy(feats, Heads(backbone, replace(inputs, prompts=None, waffle=Waffle(seed=seed)),
                                           ctx).get("waffle", ds.classes))
                     for seed in range(settings.waffle_seeds)) / settings.waffle_seeds
        results.add(name, "test", "waffle", "top1", waffle)

    results.each(settings.names(B2N_DATASETS), run_one)
    results.add_paper({h: {"imagenet": v} for h, v in paper.TEXT_ONLY_IMAGENET.items()})
    return results


# -- reports ----------------------------------------------------------------------------

def _heads(rows: Sequence[dict]) -> list[str]:
    """The heads measured, in the order of the heads table."""
    return table_order([r["head"] for r in rows if r["source"] == "measured"])


def markdown(result: dict) -> str:
    p, rows = result["protocol"], result["rows"]
    measured = [r for r in rows if r["source"] == "measured"]
    paper_rows = [r for r in rows if r["source"] == "paper"]
    heads = _heads(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in measured))
    lines = [f"# {p}", ""]
    if p == "base2novel":
        def triple(dataset: str, head: str, source: str = "measured") -> str:
            return " / ".join(rp.number(rp.value(rows, dataset=dataset, split=s, head=head, source=source))
                              for s in ("base", "novel", "all"))

        table = [[d, *[triple(d, h) for h in heads]] for d in datasets]
        table.append(["**mean**", *[" / ".join(rp.number(rp.mean([rp.value(rows, dataset=d, split=s, head=h)
                                                                     for d in datasets]))
                                               for s in ("base", "novel", "all")) for h in heads]])
        table.append(["paper mean (11 datasets)", *[triple("mean", h, "paper") for h in heads]])
        lines += rp.markdown(["dataset", *[f"{method_name(h)} base/novel/HM" for h in heads]], table)
    else:
        info = result["datasets"]
        table = [[d, info.get(d, {}).get("images", ""), *[rp.number(rp.value(measured, dataset=d, head=h))
                                                          for h in heads],
                  rp.number(rp.value(paper_rows, dataset=d, head="protext", source="paper"))] for d in datasets]
        targets = [d for d in datasets if not (p == "cross-dataset" and d == "imagenet")]
        table.append(["**mean**", "", *[rp.number(rp.mean([rp.value(measured, dataset=d, head=h) for d in targets]))
                                        for h in heads],
                      rp.number(rp.value(paper_rows, dataset="mean", head="protext", source="paper"))])
        lines += rp.markdown(["dataset", "images", *heads, "paper ProText"], table)
        if p == "text-only":
            lines += _method_table(result)
    not_run = {k: v for k, v in result["not_run"].items()}
    if result["missing"]:
        lines += ["", "Not run:"] + [f"- {k}: {v}" for k, v in result["missing"].items()]
    if not_run:
        lines += ["", "Heads not run:"] + [f"- {k.replace('/', ' / ')}: {v}" for k, v in not_run.items()]
    skipped = sum(d.get("skipped", 0) for d in result["datasets"].values())
    lines += ["", f"Unreadable images skipped: {skipped} (listed in the JSON file)."]
    return "\n".join(lines) + "\n"


def _method_table(result: dict) -> list[str]:
    """The paper's text-only ImageNet table: one row per method, measured beside published."""
    rows = result["rows"]
    table = []
    for head in table_order([*HEADS, *COMBINATIONS]):
        measured = rp.value(rows, dataset="imagenet", head=head)
        published = rp.value(rows, dataset="imagenet", head=head, source="paper")
        table.append([method_name(head), "not run" if measured is None else rp.number(measured),
                      "–" if published is None else published])
    return ["", f"ImageNet, text-only (WaffleCLIP: mean of {result.get('waffle_seeds', 1)} seeds)", "",
            *rp.markdown(["method", "protext top-1", "paper (CLIP ViT-B/16)"], table)]


def write_report(result: dict, out: Path) -> dict[str, Path]:
    """`<protocol>.json` (everything), `.csv` (the rows), `.md` (the table) and `.png` (the chart)."""
    out = Path(out)
    name = result["protocol"]
    files = {"json": out / f"{name}.json", "csv": out / f"{name}.csv", "markdown": out / f"{name}.md"}
    atomic_write_json(files["json"], result)
    atomic_write_bytes(files["csv"], rp.to_csv(result["rows"]))
    atomic_write_bytes(files["markdown"], markdown(result).encode())
    measured = [r for r in result["rows"] if r["source"] == "measured"]
    metric = "hm" if name == "base2novel" else "top1"
    png = rp.chart([r for r in measured if r["metric"] == metric], _heads(measured), out / f"{name}.png",
                   f"protext {name}", "HM (%)" if metric == "hm" else "top-1 accuracy (%)",
                   lambda rs: rs[0]["value"] if rs else None)
    if png:
        files["png"] = png
    return files

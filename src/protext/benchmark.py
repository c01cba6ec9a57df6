"""The paper's four image protocols, each one call, each writing JSON, Markdown and a chart.

- cross-dataset:          prompts trained on ImageNet descriptions, tested on ImageNet and 10 others;
- base2novel:             per dataset, prompts trained on the base classes' descriptions,
                          tested on base and novel classes (HM);
- domain-generalization:  the ImageNet prompts on ImageNetV2, -Sketch, -A, -R;
- text-only:              per dataset, prompts trained on all its classes' descriptions.

A dataset missing under the data root is reported (with what was expected where) and the
others still run. Image features and trained prompts are cached, so a rerun only does
what is new.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import paper
from .backbone import Backbone
from .cache import atomic_write_bytes, atomic_write_json
from .datasets import CROSS_DATASET_TARGETS, DOMAIN_SHIFTS, Dataset, base_novel, load_dataset
from .descriptions import load_descriptions, select_classes
from .errors import ProtextError
from .features import Features, extract
from .heads import Heads, Waffle, head_names
from .metrics import harmonic_mean, top1
from .model import ProText
from .sources import SOURCES, fetch, load_descriptors
from .train import TrainConfig, load_or_train, make_config

B2N_DATASETS = ("imagenet", *CROSS_DATASET_TARGETS)
# Each protocol trains with the paper's preset for it.
PRESETS = {"cross-dataset": "cross-dataset", "domain-generalization": "imagenet-200ep", "base2novel": "base2novel",
           "text-only": "text-only"}


def run(protocol: str, backbone: Backbone, data_root: Path, out: Path, prompts: ProText | None = None,
        prompts_dir: Path | None = None, descriptions_dir: Path | None = None, datasets: Sequence[str] | None = None,
        config_file: Path | None = None, overrides: Mapping | None = None, cache_dir: Path | None = None,
        show_progress: bool = True, descriptors_dir: Path | None = None,
        waffle_seeds: int = 7) -> tuple[dict, dict[str, Path]]:
    """Run one protocol and write its report to `out`; returns the result and the files written.

    Without `prompts`, cross-dataset and domain generalisation train ImageNet prompts into
    `out/prompts-<preset>` (or reuse them there); base2novel and text-only train one prompt set
    per dataset into `prompts_dir` (default `out/prompts`). Settings: the protocol's preset,
    then `config_file`, then `overrides`. Text-only also runs DCLIP (descriptors from
    `descriptors_dir/<dataset>.json` or the public dclip:<dataset>) and WaffleCLIP (mean of
    `waffle_seeds` seeds).
    """
    if protocol not in PRESETS:
        raise ProtextError(f"unknown protocol {protocol!r}; choose from {', '.join(PRESETS)}")
    cfg = make_config(PRESETS[protocol], config_file, overrides)
    out = Path(out)
    kw = {"datasets": list(datasets)} if datasets else {}
    if protocol in ("cross-dataset", "domain-generalization"):
        if prompts is None:
            prompts = load_or_train(backbone, lambda: load_descriptions(fetch("cupl:imagenet", cache_dir)), cfg,
                                    out / f"prompts-{PRESETS[protocol]}", cache_dir, show_progress, source="cupl:imagenet")
        if protocol == "cross-dataset":
            result = cross_dataset(backbone, prompts, data_root, cache_dir, show_progress=show_progress, **kw)
        else:
            result = domain_generalization(backbone, prompts, data_root, cache_dir, show_progress=show_progress)
    elif protocol == "base2novel":
        result = base_to_novel(backbone, data_root, prompts_dir or out / "prompts", cfg, descriptions_dir, cache_dir,
                               show_progress=show_progress, **kw)
    else:
        if waffle_seeds < 1:
            raise ProtextError(f"--waffle-seeds must be at least 1, got {waffle_seeds}")
        result = text_only(backbone, data_root, prompts_dir or out / "prompts", cfg, descriptions_dir, cache_dir,
                           show_progress=show_progress, descriptors_dir=descriptors_dir, waffle_seeds=waffle_seeds, **kw)
    return result, write_report(result, out)


def accuracy(features: Features, weights: torch.Tensor) -> float:
    return top1(features.feats, features.labels, weights)


def evaluate(backbone: Backbone, dataset: Dataset, heads: Heads, names: Sequence[str], cache_dir: Path | None = None,
             show_progress: bool = True) -> dict:
    """Top-1 accuracy of each named head on `dataset`, plus counts and skipped files."""
    for name in names:
        head_names(name)  # an unknown head is an error before any image is read
    feats = extract(backbone, dataset, cache_dir, show_progress=show_progress)
    row = {"dataset": dataset.name, "split": dataset.split, "classes": len(dataset.classes),
           "images": len(feats.labels), "skipped": len(feats.skipped), "skipped_files": feats.skipped[:50],
           "notes": dataset.notes}
    for name in names:
        row[name] = accuracy(feats, heads.get(name, dataset.classes, dataset.name))
    return row


def descriptions_for(dataset: str, descriptions_dir: Path | None, cache_dir: Path | None) -> dict | None:
    """`<descriptions_dir>/<dataset>.json`, else the public CuPL set of that name, else None."""
    if descriptions_dir is not None and (Path(descriptions_dir) / f"{dataset}.json").is_file():
        return load_descriptions(Path(descriptions_dir) / f"{dataset}.json")
    if f"cupl:{dataset}" in SOURCES:
        return load_descriptions(fetch(f"cupl:{dataset}", cache_dir))
    return None


def _each(names: Sequence[str], run: Callable[[str], dict | list[dict]], missing: dict) -> list[dict]:
    rows = []
    for name in names:
        try:
            out = run(name)
        except ProtextError as e:
            missing[name] = str(e)
            continue
        rows.extend(out if isinstance(out, list) else [out])
    return rows


def cross_dataset(backbone: Backbone, prompts: ProText, data_root: Path, cache_dir: Path | None = None,
                  datasets: Sequence[str] = ("imagenet", *CROSS_DATASET_TARGETS), show_progress: bool = True) -> dict:
    heads = Heads(backbone, prompts, prompts_descriptions(prompts, cache_dir), cache_dir, cross_dataset=True)
    missing: dict[str, str] = {}
    rows = _each(datasets, lambda d: evaluate(backbone, load_dataset(d, data_root), heads, ("clip", "cupl", "protext"),
                                              cache_dir, show_progress), missing)
    targets = [r for r in rows if r["dataset"] != "imagenet"]
    summary = {h: _mean(targets, h) for h in ("clip", "cupl", "protext")}
    return {"protocol": "cross-dataset", "rows": rows, "mean_of_targets": summary, "missing": missing,
            "paper": {"protext": paper.CROSS_DATASET_PROTEXT, "mean": paper.CROSS_DATASET_MEAN}}


def prompts_descriptions(prompts: ProText, cache_dir: Path | None) -> dict | None:
    """The ImageNet descriptions the cross-dataset prompts were trained on, for the CuPL head."""
    source = prompts.config.training.get("source")
    if source in SOURCES:
        return load_descriptions(fetch(source, cache_dir))
    if source and Path(source).is_file():
        return load_descriptions(source)
    return None


def domain_generalization(backbone: Backbone, prompts: ProText, data_root: Path, cache_dir: Path | None = None,
                          show_progress: bool = True) -> dict:
    heads = Heads(backbone, prompts, prompts_descriptions(prompts, cache_dir), cache_dir)
    missing: dict[str, str] = {}
    rows = _each(DOMAIN_SHIFTS, lambda d: evaluate(backbone, load_dataset(d, data_root), heads,
                                                   ("clip", "cupl", "protext"), cache_dir, show_progress), missing)
    return {"protocol": "domain-generalization", "rows": rows, "mean": {h: _mean(rows, h) for h in ("clip", "cupl", "protext")},
            "missing": missing, "paper": {"rows": paper.DOMAIN_GENERALIZATION, "mean": paper.DOMAIN_GENERALIZATION_MEAN}}


def base_to_novel(backbone: Backbone, data_root: Path, prompts_dir: Path, cfg: TrainConfig,
                  descriptions_dir: Path | None = None, cache_dir: Path | None = None,
                  datasets: Sequence[str] = B2N_DATASETS, show_progress: bool = True) -> dict:
    def run(name: str) -> dict:
        full = load_dataset(name, data_root)
        data = descriptions_for(name, descriptions_dir, cache_dir)
        if data is None:
            raise ProtextError(f"no descriptions for {name}: expected {descriptions_dir or '<--descriptions-dir>'}/{name}.json")
        base, novel = base_novel(full, "base"), base_novel(full, "novel")
        base_data = select_classes(data, base.classes, name)
        prompts = load_or_train(backbone, base_data, cfg, Path(prompts_dir) / name, cache_dir, show_progress)
        heads = Heads(backbone, prompts, base_data, cache_dir)  # novel classes have no descriptions: CuPL falls back
        b = evaluate(backbone, base, heads, ("clip", "cupl", "protext"), cache_dir, show_progress)
        n = evaluate(backbone, novel, heads, ("clip", "cupl", "protext"), cache_dir, show_progress)
        row = {"dataset": name, "images": b["images"] + n["images"], "skipped": b["skipped"] + n["skipped"]}
        for h in ("clip", "cupl", "protext"):
            row[h] = (b[h], n[h], harmonic_mean(b[h], n[h]))
        return row

    missing: dict[str, str] = {}
    rows = _each(datasets, run, missing)
    mean = {h: tuple(_mean([{"v": r[h][i]} for r in rows], "v") for i in range(3)) for h in ("clip", "cupl", "protext")}
    return {"protocol": "base2novel", "rows": rows, "mean": mean, "missing": missing, "paper": {"mean": paper.BASE2NOVEL_MEAN}}


TEXT_ONLY_HEADS = ("clip", "clip80", "dclip", "waffle", "cupl", "protext", "protext+cupl")
METHOD_NAMES = {"clip": "CLIP", "clip80": "CLIP-80", "dclip": "DCLIP", "waffle": "WaffleCLIP", "cupl": "CuPL",
                "protext": "ProText", "protext+cupl": "ProText+CuPL"}


def descriptors_for(dataset: str, descriptors_dir: Path | None, cache_dir: Path | None) -> dict | None:
    """`<descriptors_dir>/<dataset>.json`, else the public DCLIP set of that name, else None."""
    if descriptors_dir is not None and (Path(descriptors_dir) / f"{dataset}.json").is_file():
        return load_descriptors(str(Path(descriptors_dir) / f"{dataset}.json"))
    if f"dclip:{dataset}" in SOURCES:
        return load_descriptors(f"dclip:{dataset}", cache_dir)
    return None


def text_only(backbone: Backbone, data_root: Path, prompts_dir: Path, cfg: TrainConfig, descriptions_dir: Path | None = None,
              cache_dir: Path | None = None, datasets: Sequence[str] = B2N_DATASETS, show_progress: bool = True,
              descriptors_dir: Path | None = None, waffle_seeds: int = 7) -> dict:
    """Every text-only method of the paper's ImageNet table on each dataset. WaffleCLIP is the
    mean over `waffle_seeds` seeds, as its paper reports it; a head without data for a dataset
    (DCLIP descriptors) is listed under `not_run`, never replaced by another."""
    def run(name: str) -> dict:
        ds = load_dataset(name, data_root)
        data = descriptions_for(name, descriptions_dir, cache_dir)
        if data is None:
            raise ProtextError(f"no descriptions for {name}: expected {descriptions_dir or '<--descriptions-dir>'}/{name}.json")
        data = select_classes(data, ds.classes, name)
        prompts = load_or_train(backbone, data, cfg, Path(prompts_dir) / name, cache_dir, show_progress)
        heads, not_run = list(TEXT_ONLY_HEADS), {}
        try:
            descriptors = descriptors_for(name, descriptors_dir, cache_dir)
            descriptors = select_classes(descriptors, ds.classes, f"dclip ({name})", "descriptor") if descriptors else None
        except ProtextError as e:  # no file, no download, or classes it lacks: this head is not run
            descriptors = None
            not_run["dclip"] = str(e)
        if descriptors is None:
            heads.remove("dclip")
            not_run.setdefault("dclip", f"no DCLIP descriptors for {name}")
        built = Heads(backbone, prompts, data, cache_dir, descriptors=descriptors)
        row = evaluate(backbone, ds, built, [h for h in heads if h != "waffle"], cache_dir, show_progress)
        feats = extract(backbone, ds, cache_dir, show_progress=False)  # from the cache evaluate just filled
        row["waffle"] = sum(accuracy(feats, Heads(backbone, None, data, cache_dir, descriptors=descriptors,
                                                  waffle=Waffle(seed=seed)).get("waffle", ds.classes, name))
                            for seed in range(waffle_seeds)) / waffle_seeds
        row["not_run"] = not_run
        return row

    missing: dict[str, str] = {}
    rows = _each(datasets, run, missing)
    return {"protocol": "text-only", "rows": rows, "mean": {h: _mean(rows, h) for h in TEXT_ONLY_HEADS},
            "waffle_seeds": waffle_seeds, "missing": missing, "paper": {"imagenet": paper.TEXT_ONLY_IMAGENET}}


def _mean(rows: Sequence[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


# -- reports ----------------------------------------------------------------------------

def markdown(result: dict) -> str:
    p = result["protocol"]
    lines = [f"# {p}", ""]
    if p == "base2novel":
        lines += ["| dataset | CLIP base/novel/HM | CuPL base/novel/HM | ProText base/novel/HM |", "|---|---|---|---|"]
        fmt = lambda t: " / ".join(f"{v:.2f}" for v in t)  # noqa: E731
        for r in result["rows"]:
            lines.append(f"| {r['dataset']} | {fmt(r['clip'])} | {fmt(r['cupl'])} | {fmt(r['protext'])} |")
        m, pm = result["mean"], result["paper"]["mean"]
        lines.append(f"| **mean** | {fmt(m['clip'])} | {fmt(m['cupl'])} | {fmt(m['protext'])} |")
        lines.append(f"| paper mean (11 datasets) | {fmt(pm['clip'])} | {fmt(pm['cupl'])} | {fmt(pm['protext'])} |")
    else:
        heads = [h for h in TEXT_ONLY_HEADS if any(h in r for r in result["rows"])]
        paper_col = {"cross-dataset": result["paper"].get("protext", {}),
                     "domain-generalization": result["paper"].get("rows", {}).get("protext", {}),
                     "text-only": {"imagenet": result["paper"].get("imagenet", {}).get("protext")}}[p]
        lines += ["| dataset | images | " + " | ".join(heads) + " | paper ProText |", "|---" * (len(heads) + 3) + "|"]
        for r in result["rows"]:
            ref = paper_col.get(r["dataset"])
            lines.append(f"| {r['dataset']} | {r['images']} | " + " | ".join(_cell(r, h) for h in heads)
                         + f" | {ref if ref is not None else '–'} |")
        mean = result.get("mean_of_targets") or result.get("mean")
        paper_mean = result["paper"].get("mean", {})
        lines.append("| **mean** | | " + " | ".join(f"{mean[h]:.2f}" for h in heads) + f" | {paper_mean.get('protext', '–')} |")
        if p == "text-only":
            lines += _method_table(result)
    if result["missing"]:
        lines += ["", "Not run:"] + [f"- {k}: {v}" for k, v in result["missing"].items()]
    skipped = sum(r.get("skipped", 0) for r in result["rows"])
    lines += ["", f"Unreadable images skipped: {skipped} (listed in the JSON file)."]
    return "\n".join(lines) + "\n"


def _cell(row: dict, head: str) -> str:
    return f"{row[head]:.2f}" if head in row else "not run"


def _method_table(result: dict) -> list[str]:
    """The paper's text-only ImageNet table: one row per method, measured beside published."""
    imagenet = next((r for r in result["rows"] if r["dataset"] == "imagenet"), None)
    published = result["paper"]["imagenet"]
    lines = ["", f"ImageNet, text-only (WaffleCLIP: mean of {result.get('waffle_seeds', 1)} seeds)", "",
             "| method | protext top-1 | paper (CLIP ViT-B/16) |", "|---|---|---|"]
    for head in TEXT_ONLY_HEADS:
        measured = _cell(imagenet, head) if imagenet else "not run"
        lines.append(f"| {METHOD_NAMES[head]} | {measured} | {published.get(head, '–')} |")
    not_run = {(r["dataset"], h): why for r in result["rows"] for h, why in r.get("not_run", {}).items()}
    if not_run:
        lines += ["", "Heads not run:"] + [f"- {d} / {h}: {why}" for (d, h), why in not_run.items()]
    return lines


def chart(result: dict, path: Path) -> Path | None:
    """A bar chart per dataset and head, written atomically; None when no dataset ran."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    if not rows:
        return None
    heads = [h for h in TEXT_ONLY_HEADS if all(h in r for r in rows)]
    pick = (lambda r, h: r[h][2]) if result["protocol"] == "base2novel" else (lambda r, h: r[h])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4))
    width = 0.8 / len(heads)
    for k, h in enumerate(heads):
        ax.bar([i + k * width for i in range(len(rows))], [pick(r, h) for r in rows], width, label=h)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["dataset"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("HM (%)" if result["protocol"] == "base2novel" else "top-1 accuracy (%)")
    ax.set_title(f"protext {result['protocol']}")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path


def write_report(result: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    name = result["protocol"]
    atomic_write_json(out / f"{name}.json", result)
    atomic_write_bytes(out / f"{name}.md", markdown(result).encode())
    files = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    png = chart(result, out / f"{name}.png")
    if png:
        files["png"] = png
    return files

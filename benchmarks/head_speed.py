"""What each head costs when labelling: images per second of `protext.label.label` per head.

Model: a randomly initialised CLIP with ViT-B/16's image tower (width 768, 12 layers, 224 px,
16 px patches). Images: the real ImageNet JPEGs in ../shared/data. Label set: the 37 pet breeds,
with CuPL's pet descriptions (cupl, awt) and differential captions made up for every pair (fudd).
The class embeddings are built before timing. awt encodes 1 + 50 views of every image, so it runs
on fewer images; the figure to read is images/s and its ratio to clip.

    python benchmarks/head_speed.py [--images 32] [--awt-images 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--awt-images", type=int, default=4)
    args = ap.parse_args()

    from protext.classifier import ProTextClassifier
    from protext.context import QUIET
    from protext.descriptions import load_descriptions
    from protext.heads import HeadInputs
    from protext.label import label
    from protext.tiny import tiny_clip

    backbone = tiny_clip(seed=0, width=512, layers=12, heads=8, projection=512, vision_width=768, vision_layers=12,
                         vision_heads=12, image_size=224, patch=16)
    descriptions = load_descriptions(SHARED / "descriptions" / "cupl" / "pets_prompts_full.json", keep_blank=True)
    classes = list(descriptions)
    differential = {a: {b: [f"a photo of a {a} next to a {b}"]} for a, b in combinations(classes, 2)}
    inputs = HeadInputs(descriptions=descriptions, differential=differential, dataset="oxford_pets")
    images = sorted((SHARED / "images" / "imagenet_sample").rglob("*.JPEG"))
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for head in ("clip", "cupl", "fudd", "awt"):
            clf = ProTextClassifier(backbone, classes, head, inputs, QUIET)
            n = args.awt_images if head == "awt" else args.images
            label(clf, images[:2], Path(tmp) / f"warm-{head}.jsonl", ctx=QUIET)  # the second-pass texts, threads
            start = time.perf_counter()
            label(clf, images[:n], Path(tmp) / f"{head}.jsonl", ctx=QUIET)
            rates[head] = n / (time.perf_counter() - start)
            print(f"{head:6s} {n:4d} images  {rates[head]:7.2f} images/s  ({rates[head] / rates['clip']:.3f} x clip)",
                  flush=True)
    print(json.dumps({h: round(r, 3) for h, r in rates.items()}))


if __name__ == "__main__":
    main()

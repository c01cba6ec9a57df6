"""Time and memory of building each head for a large label set, on a ViT-B/16-shaped random CLIP.

Builds every head (clip, clip80, cupl, dclip, waffle, protext, and a '+' combination) for the
first `--classes` ImageNet classes with the real CuPL descriptions and DCLIP descriptors from
../shared/data, each from an empty text cache, then builds them all again from the cache
(sentences already encoded are not encoded again). Prints sentences encoded, seconds and the
peak resident memory of each head.

    python benchmarks/head_build.py [--classes 1000] [--heads clip,clip80,cupl,dclip,waffle,protext,protext+cupl]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from measure import IMAGENET_DESCRIPTIONS, SHARED, PeakRSS, vit_b16_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--heads", default="clip,clip80,cupl,dclip,waffle,protext,protext+cupl")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from protext.descriptions import load_descriptions, normalize_name
    from protext.context import Context
    from protext.heads import HeadInputs, Heads
    from protext.model import ProText
    from protext.sources import load_descriptors

    descriptions = load_descriptions(IMAGENET_DESCRIPTIONS)
    descriptors = load_descriptors(str(SHARED / "descriptions" / "dclip" / "descriptors_imagenet.json"), published=True)
    classes = [c for c in descriptions if normalize_name(c) in descriptors][: args.classes]
    backbone = vit_b16_clip([s for v in descriptions.values() for s in v], args.device)
    prompts = ProText.create(backbone, n_ctx=4, depth=9)
    cache = Path(tempfile.mkdtemp(prefix="protext-heads-"))
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, {len(classes)} ImageNet classes, "
          f"ViT-B/16-shaped random CLIP")
    print("| head | build | sentences | seconds | peak RSS MiB |\n|---|---|---|---|---|")
    for attempt in ("first", "again"):
        for head in args.heads.split(","):
            heads = Heads(backbone, HeadInputs(prompts, descriptions, descriptors, dataset="imagenet"),
                          Context(cache / head))
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                weights = heads.get(head, classes)
                seconds = time.perf_counter() - t0
            sentences = sum(len(heads.sentences_of(h, classes)) for h in head.split("+"))
            print(f"| {head} | {attempt} | {sentences} | {seconds:.2f} | {mem.peak:.0f} |", flush=True)
            assert weights.shape == (len(classes), backbone.text.feature_dim)


if __name__ == "__main__":
    main()

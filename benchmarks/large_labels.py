"""An ImageNet-21k-sized label set: building the protext head, then scoring many cached features.

Builds the `protext` head (ViT-B/16-shaped random CLIP, deep prompts) for `--classes` names
(default 21,843, as ImageNet-21k), batched by token length with a progress bar, then scores
`--features` random normalised image features against it with `metrics.top_k` in chunks,
keeping only the top 5 per image. Prints time and peak resident memory of each part, and what
the full score matrix would have needed.

    python benchmarks/large_labels.py [--classes 21843] [--features 1000000]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from measure import IMAGENET_DESCRIPTIONS, PeakRSS, vit_b16_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=21843)
    ap.add_argument("--features", type=int, default=1_000_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from protext.descriptions import load_descriptions
    from protext.metrics import top_k
    from protext.model import ProText

    descriptions = load_descriptions(IMAGENET_DESCRIPTIONS)
    backbone = vit_b16_clip([s for v in descriptions.values() for s in v], args.device)
    # ImageNet names, then two-name combinations, until there are enough distinct names
    base = list(descriptions)
    names = list(itertools.islice(itertools.chain(base, (f"{a} {b}" for a in base for b in base if a != b)),
                                  args.classes))
    prompts = ProText.create(backbone, n_ctx=4, depth=9)
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, {len(names)} classes, "
          f"{args.features} image features")
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        weights = prompts.encode_classes(names, show_progress=True)
        build = time.perf_counter() - t0
    print(f"protext head: {build:.1f} s ({len(names) / build:.0f} classes/s), peak RSS {mem.peak:.0f} MiB")
    feats = torch.nn.functional.normalize(torch.randn(args.features, weights.shape[1]), dim=-1)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        values, indices = top_k(feats, weights, k=5)
        score = time.perf_counter() - t0
    full = args.features * len(names) * 4 / 2**30
    print(f"top-5 of {args.features} features: {score:.1f} s ({args.features / score:.0f} images/s), peak RSS "
          f"{mem.peak:.0f} MiB (the full score matrix would need {full:.1f} GiB)")
    assert indices.shape == (args.features, 5)


if __name__ == "__main__":
    main()

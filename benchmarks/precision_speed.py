"""The image tower in each --precision against fp32: images/s, and how far the features move.

Model: a randomly initialised CLIP of ViT-B/16's shape (`measure.vit_b16_clip`: image tower
width 768, 12 layers, 224 px, 16 px patches; text tower width 512, 12 layers). Images: the
real JPEGs in ../shared/data/images, decoded and preprocessed before timing.

- speed: the tower alone on `--images` preprocessed images in batches of `--batch-size`, the
  precisions alternating for `--rounds` rounds; each precision's fastest round counts, so
  load from other processes hurts all alike.
- agreement, over every shared image: the cosine of each image's features with fp32's (mean
  and minimum), and the top-1 agreement of the `clip` head ("a photo of a {}.") over the ImageNet class
  names (../shared/data/classnames: 1,000, of which 998 distinct; "crane" and "maillot" repeat).

On random weights the agreement bounds the numerical error of the lower precision, not the
accuracy of a trained model under it. The last line is the speed ratio of the first
non-fp32 precision over fp32 (the int8 target on the CPU: at least 2.5).

    python benchmarks/precision_speed.py [--precisions fp32,int8] [--images 48] [--rounds 2] [--device cpu]
                                         [--agreement-images 200]
"""

from __future__ import annotations

import argparse
import json
import time

from measure import SHARED, vit_b16_clip


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default=None, help="comma-separated, fp32 first (default: fp32,int8 on the CPU, "
                                                       "fp32,bf16,fp16 on CUDA)")
    ap.add_argument("--images", type=int, default=48, help="images timed per round (the shared ones, cycled)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 on the CPU, 256 on CUDA")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--agreement-images", type=int, default=None, help="how many shared images the agreement is "
                                                                       "measured on (default: all 200)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from protext.classifier import ProTextClassifier
    from protext.context import Context
    from protext.engine import default_batch_size
    from protext.images import list_images, load_pixels

    cuda = args.device.startswith("cuda")
    precisions = (args.precisions or ("fp32,bf16,fp16" if cuda else "fp32,int8")).split(",")
    if precisions[0] != "fp32":
        raise SystemExit("--precisions must start with fp32, the reference")
    batch = default_batch_size(args.batch_size, args.device)
    names = list(dict.fromkeys(json.loads((SHARED / "classnames" / "imagenet.json").read_text())))  # 2 names repeat
    fp32 = vit_b16_clip([f"a photo of a {n}." for n in names], args.device)
    towers = {p: fp32.at_precision(p) for p in precisions}
    tower = fp32.image
    files = list_images(SHARED / "images")[: args.agreement_images]
    pixels = torch.stack([load_pixels(f, tower.image_size, tower.mean, tower.std) for f in files])
    timed = pixels[torch.arange(args.images) % len(pixels)]

    def forward(backbone, x: torch.Tensor) -> torch.Tensor:
        out = [backbone.image(x[i: i + batch].to(args.device)).cpu() for i in range(0, len(x), batch)]
        return torch.cat(out)

    def speed(backbone) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward(backbone, timed)
        if cuda:
            torch.cuda.synchronize()
        return len(timed) / (time.perf_counter() - t0)

    for b in towers.values():
        forward(b, timed[: min(batch, 4)])  # warm-up
    rounds = [{p: speed(b) for p, b in towers.items()} for _ in range(args.rounds)]
    best = {p: max(r[p] for r in rounds) for p in precisions}

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        clf = ProTextClassifier(fp32, names, "clip", ctx=Context(Path(tmp), args.device, progress=False))
        feats = {p: forward(b, pixels) for p, b in towers.items()}
        top1 = {p: clf.logits(f).argmax(1) for p, f in feats.items()}

    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"{device}; ViT-B/16-shaped random CLIP; speed: {len(timed)} preprocessed real images, batch {batch}, "
          f"fastest of {args.rounds} rounds; agreement: {len(files)} real images, clip head over {len(names)} "
          f"ImageNet classes")
    print("| precision | images/s | x fp32 | feature cosine with fp32: mean | min | top-1 agreement with fp32 |")
    print("|---|---|---|---|---|---|")
    for p in precisions:
        cos = torch.nn.functional.cosine_similarity(feats[p], feats["fp32"], dim=1)
        agree = float((top1[p] == top1["fp32"]).float().mean())
        print(f"| {p} | {best[p]:.2f} | {best[p] / best['fp32']:.2f} | {float(cos.mean()):.5f} | "
              f"{float(cos.min()):.5f} | {100 * agree:.1f}% |")
    print("rounds: " + "; ".join(", ".join(f"{p} {r[p]:.2f}" for p in precisions) for r in rounds))
    if len(precisions) > 1:
        p = precisions[1]
        print(f"{p} / fp32 images per second: {best[p] / best['fp32']:.2f}")


if __name__ == "__main__":
    main()

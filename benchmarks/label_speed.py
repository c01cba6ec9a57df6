"""`protext label` vs a bare forward pass: images per second on the same images and model.

Model: a randomly initialised CLIP with ViT-B/16's image tower (width 768, 12 layers, 224 px,
16 px patches) and text tower. Images: the real ImageNet JPEGs in ../shared/data.

- label: `protext.label.label` into a fresh .jsonl: decoding in threads overlapping the
  forward, probabilities, top-k rows, parts written atomically, the output file at the end;
- bare forward: the same image tower and head on tensors decoded and preprocessed
  beforehand (not timed).

The two alternate for `--rounds` rounds and each path's fastest round counts, so that load
from other processes on a shared machine hurts both alike.

The class embeddings are built before timing (both paths score with the same head). The last
line is the ratio of images per second, label over bare forward (target: at least 0.9).
`--precision` runs both paths with the image tower in int8, bf16 or fp16 (`--device cuda`);
more `--images` than the sample holds cycle through it.

    python benchmarks/label_speed.py [--images 64] [--batch-size 32] [--rounds 2] [--device cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "images" / "imagenet_sample"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="how many images (the 100 of the sample, cycled)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: protext's for the device (32 CPU, 256 GPU)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both paths; the fastest of each counts")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8", "bf16", "fp16"])
    args = ap.parse_args()

    import torch

    from protext.engine import default_batch_size

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batch_size = default_batch_size(args.batch_size, device)

    from protext.classifier import ProTextClassifier
    from protext.context import QUIET, Context
    from protext.images import load_pixels
    from protext.label import label
    from protext.tiny import tiny_clip

    torch.manual_seed(0)
    backbone = tiny_clip(seed=0, width=512, layers=12, heads=8, projection=512, vision_width=768, vision_layers=12,
                         vision_heads=12, image_size=224, patch=16).to(device).at_precision(args.precision)
    sample = sorted(IMAGES.iterdir())
    files = [sample[i % len(sample)] for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        clf = ProTextClassifier(backbone, [f"class number {i}" for i in range(100)], "clip",
                                ctx=Context(Path(tmp), device))
        tower = backbone.image
        pixels = [load_pixels(f, tower.image_size, tower.mean, tower.std) for f in files]

        def bare_forward() -> float:
            t0 = time.perf_counter()
            for i in range(0, len(pixels), args.batch_size):
                clf.logits(tower(torch.stack(pixels[i : i + args.batch_size]).to(device)).cpu()).softmax(-1)
            return len(pixels) / (time.perf_counter() - t0)

        def label_run(i: int) -> float:
            t0 = time.perf_counter()
            report = label(clf, files, Path(tmp) / f"labels-{i}.jsonl", batch_size=args.batch_size, ctx=QUIET)
            return report.processed / (time.perf_counter() - t0)

        tower(torch.stack(pixels[: args.batch_size]).to(device))  # warm-up
        rounds = [(bare_forward(), label_run(i)) for i in range(args.rounds)]
        bare, labelled = max(b for b, _ in rounds), max(v for _, v in rounds)

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"{name}, {args.precision}, torch threads: {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{len(files)} real JPEGs, ViT-B/16-shaped random CLIP, 100 classes")
    print("| path | images/s |")
    print("|---|---|")
    print(f"rounds (bare, label): {', '.join(f'({b:.2f}, {v:.2f})' for b, v in rounds)}")
    print(f"| bare forward + softmax on decoded tensors (fastest round) | {bare:.2f} |")
    print(f"| protext label: decode + preprocess + forward + rows + atomic parts + output (fastest round) | {labelled:.2f} |")
    print(f"label / bare forward images per second: {labelled / bare:.2f}")


if __name__ == "__main__":
    main()

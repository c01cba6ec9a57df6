"""Image feature extraction through protext's cache path vs a bare model forward, and head scoring.

Model: a randomly initialised CLIP with ViT-B/16's image tower (width 768, 12 layers, 224 px,
16 px patches) and text tower. Images: the 100 real ImageNet JPEGs in ../shared/data.

- cache path: `protext.training.evaluate.extract` on a fresh cache: decode + preprocess in threads,
  image tower forward, atomic store;
- bare forward: the same tower on tensors decoded and preprocessed beforehand (not timed).

Also the time to score 10,000 cached features with a new head (100 classes), and the time
to build that head. The last line is the images/s ratio, cache path over bare forward.

    python benchmarks/eval_speed.py [--repeat 2] [--batch-size 32]
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
    ap.add_argument("--repeat", type=int, default=2, help="how many times the 100 images are listed")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    args = ap.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    from protext.context import Context
    from protext.training.evaluate import accuracy
    from protext.training.datasets import Dataset
    from protext.training.evaluate import LabelledFeatures, extract
    from protext.heads import Heads
    from protext.images import open_image, preprocess
    from protext.tiny import tiny_clip

    torch.manual_seed(0)
    backbone = tiny_clip(seed=0, width=512, layers=12, heads=8, projection=512, vision_width=768, vision_layers=12,
                         vision_heads=12, image_size=224, patch=16).to(device)
    files = sorted(IMAGES.iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        # copies, so the cache path cannot benefit from anything cached earlier
        samples = []
        for r in range(args.repeat):
            for i, f in enumerate(files):
                dst = Path(tmp) / "imgs" / f"{r}_{f.name}"
                dst.parent.mkdir(exist_ok=True)
                dst.write_bytes(f.read_bytes())
                samples.append((dst, i))
        dataset = Dataset("imagenet_sample", "test", [f.stem for f in files], samples)
        tower = backbone.image
        pixels = [preprocess(open_image(p), tower.image_size, tower.mean, tower.std) for p, _ in samples]

        def bare_forward() -> float:
            t0 = time.perf_counter()
            for i in range(0, len(pixels), args.batch_size):
                tower(torch.stack(pixels[i : i + args.batch_size]).to(device)).cpu()
            return len(pixels) / (time.perf_counter() - t0)

        tower(torch.stack(pixels[: args.batch_size]).to(device))  # warm-up
        before = bare_forward()
        t0 = time.perf_counter()
        feats = extract(backbone, dataset, Context(Path(tmp) / "cache", progress=False), batch_size=args.batch_size)
        cached = len(feats.labels) / (time.perf_counter() - t0)
        bare = max(before, bare_forward())  # the faster of a run before and one after: a conservative ratio

        t0 = time.perf_counter()
        again = extract(backbone, dataset, Context(Path(tmp) / "cache", progress=False), batch_size=args.batch_size)
        reread = time.perf_counter() - t0

    classes = [f"class number {i}" for i in range(100)]
    heads = Heads(backbone, ctx=Context(Path(tempfile.mkdtemp())))
    t0 = time.perf_counter()
    weights = heads.get("clip", classes)
    build = time.perf_counter() - t0
    big = LabelledFeatures(torch.nn.functional.normalize(torch.randn(10_000, weights.shape[1], device=weights.device), dim=-1),
                   torch.randint(0, 100, (10_000,)), [])
    t0 = time.perf_counter()
    acc = accuracy(big, weights)
    score = time.perf_counter() - t0

    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"device: {where} (fp32, as extraction runs), torch threads: {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {len(samples)} real JPEGs, "
          f"ViT-B/16-shaped random CLIP")
    print("| path | images/s |")
    print("|---|---|")
    print(f"| bare forward on decoded tensors (faster of two runs) | {bare:.2f} |")
    print(f"| cache path (decode + preprocess + forward + store) | {cached:.2f} |")
    print(f"second run, all features from the cache: {reread:.3f} s for {len(again.labels)} images")
    print(f"new head for 100 classes: built in {build:.2f} s; scoring 10,000 cached features: {score * 1000:.1f} ms "
          f"(accuracy {acc:.1f}% on random features)")
    print(f"cache path / bare forward images per second: {cached / bare:.2f}")


if __name__ == "__main__":
    main()

"""Wall time of the whole 10-epoch cross-dataset recipe, projected from measured parts.

`protext train --preset cross-dataset` on the CuPL ImageNet descriptions does two things:
encode every distinct description once (the targets), then 10 epochs of steps. This script
measures both on a ViT-B/16-shaped random CLIP whose tokenizer gives real-length sequences
(`measure.vit_b16_clip`), for the paper's batching and for `--batching grouped`:

- encoding: texts/s on a sample of the descriptions, batched by length (as `train` does);
- steps: seconds per optimiser step on real ImageNet batches of 256 pairs, each path;

and projects the recipe: distinct descriptions / texts per second + 10 x steps per epoch x
seconds per step. It also prints the achieved GFLOP/s of encoding and of a step (matrix
products of the text tower: 24·width² multiply-adds-times-two per token and layer, plus the
attention products; a step runs the forward and the activation gradients, about twice the
forward, on the batch's distinct classes, in the length groups the step runs) beside the machine's nominal peak (cores x 32 fp32
FLOP per cycle x the clock /proc/cpuinfo reports: two 8-lane FMA pipes, AVX2 or AVX-512 on two
256-bit halves) and the rate of one large fp32 matrix product measured in the same run, the
practical ceiling (the reported clock is often the base clock; boost runs faster).

    python benchmarks/recipe_time.py [--encode-texts 512] [--steps 3] [--classes-per-batch 8]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch
from measure import IMAGENET_DESCRIPTIONS, vit_b16_clip

EPOCHS = 10


def peak_gflops() -> tuple[float, str]:
    """cores x 32 FLOP/cycle x clock (from /proc/cpuinfo), or None off Linux."""
    cores = torch.get_num_threads()
    try:
        mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        return float("nan"), "clock unknown"
    return cores * 32 * mhz / 1000, f"{cores} cores x 32 FLOP/cycle x {mhz / 1000:.2f} GHz"


def sgemm_gflops(device: str, n: int = 2048, repeats: int = 20) -> float:
    """The practical ceiling: GFLOP/s of one large fp32 matrix product on this device (it also
    shows the real clock: "cpu MHz" is often the base clock, and boost runs faster)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def forward_flops(lengths: list[int], width: int, layers: int) -> float:
    """Multiply-adds x 2 of the text tower's matrix products for sequences of these lengths."""
    return sum(2 * layers * (12 * n * width * width + 2 * n * n * width) for n in lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encode-texts", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per batching (after one warm-up step)")
    ap.add_argument("--classes-per-batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from protext.descriptions import load_descriptions, pairs
    from protext.model import ProText
    from protext.training.train import TrainConfig, _autocast, batch_loss, epoch_order

    data = load_descriptions(IMAGENET_DESCRIPTIONS)
    classes, texts, cls_idx, txt_idx = pairs(data)
    backbone = vit_b16_clip(texts, args.device)
    text = backbone.text
    width, layers = text.width, text.num_layers
    sample = random.Random(0).sample(texts, args.encode_texts)
    lengths = [len(t) for t in text.token_lists(sample)]
    text.encode(sample[:64])
    t0 = time.perf_counter()
    text.encode(sample)
    encode_rate = len(sample) / (time.perf_counter() - t0)
    encode_gflops = forward_flops(lengths, width, layers) / len(sample) * encode_rate / 1e9
    encode_seconds = len(texts) / encode_rate
    peak, how = peak_gflops() if args.device == "cpu" else (float("nan"), "not computed off the CPU")
    steps_per_epoch = math.ceil(len(cls_idx) / 256)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"device: {where}; {len(texts)} distinct descriptions, {len(cls_idx)} pairs, {steps_per_epoch} steps "
          f"per epoch, {EPOCHS} epochs; nominal peak {peak:.0f} GFLOP/s ({how}); measured 2048x2048 fp32 matrix "
          f"product {sgemm_gflops(args.device):.0f} GFLOP/s")
    print(f"one-time encoding: {encode_rate:.1f} texts/s, {encode_gflops:.0f} GFLOP/s -> {encode_seconds / 60:.1f} min")

    cls_t = torch.tensor(cls_idx)
    targets = torch.zeros(len(cls_idx), text.feature_dim)  # cached targets; their values do not change the cost
    print("| batching | distinct classes per batch | s/step | step GFLOP/s | projected recipe min |\n|---|---|---|---|---|")
    for batching in ("paper", "grouped"):
        cfg = TrainConfig(n_ctx=4, depth=9, batching=batching, classes_per_batch=args.classes_per_batch)
        model = ProText.create(backbone, n_ctx=4, depth=9, seed=0)
        tokens = model.class_token_lists(classes)
        opt = torch.optim.AdamW([model.prompts], lr=1e-3)
        order = epoch_order(cls_t, cfg, 0)
        batches = [order[i * 256 : (i + 1) * 256] for i in range(args.steps + 1)]
        times, flops, distinct = [], 0.0, []
        autocast, _ = _autocast(cfg, torch.device(args.device))  # bf16 on CUDA, fp32 on the CPU, as `train` runs
        for i, idx in enumerate(batches):
            t0 = time.perf_counter()
            with autocast:
                loss = batch_loss(model, tokens, cls_t[idx], targets[idx].to(args.device), cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
                lens = [len(tokens[c]) for c in torch.unique(cls_t[idx]).tolist()]
                groups = text.step_groups(lens)
                computed = [max(lens[k] for k in g) for g in groups for _ in g]  # each group padded to its longest
                flops += 2 * forward_flops(computed, width, layers)
                distinct.append(len(lens))
        step = sum(times) / len(times)
        total = encode_seconds + EPOCHS * steps_per_epoch * step
        print(f"| {batching} | {sum(distinct) / len(distinct):.1f} | {step:.2f} | {flops / sum(times) / 1e9:.0f} | "
              f"{total / 60:.1f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""Texts per second of the one-time encoding: batches in the given order vs batches by token length.

Encoding many texts (training targets, head sentences, eval-text queries) spends most of its
work on padding when a batch mixes short and long sentences. `TextTower.encode` now batches
texts of about one length together, in batches of the device's token budget
(`TextTower.token_budget`). This script encodes the same real CuPL ImageNet descriptions
three ways on a ViT-B/16-shaped random CLIP (given order; by length with a budget of 8,192
tokens; by length with the device's budget), checks the features agree (1e-5), and prints
texts/s of each; the last line is the ratio of the default to the given order.

    python benchmarks/encode_speed.py [--texts 2048] [--batch 256]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from measure import IMAGENET_DESCRIPTIONS, PeakRSS, vit_b16_clip


def in_given_order(text, texts: list[str], batch: int) -> torch.Tensor:
    """What encoding did before: consecutive batches, each padded to its longest sequence."""
    with torch.no_grad():
        return torch.cat([text(text.tokenize(texts[i : i + batch]).to(text.device)).cpu()
                          for i in range(0, len(texts), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=2048, help="how many ImageNet descriptions (random sample)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from protext.descriptions import load_descriptions

    all_texts = [s for v in load_descriptions(IMAGENET_DESCRIPTIONS).values() for s in v]
    texts = random.Random(0).sample(all_texts, min(args.texts, len(all_texts)))
    text = vit_b16_clip(all_texts, args.device).text
    lengths = [len(t) for t in text.token_lists(texts)]
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, {len(texts)} ImageNet descriptions, "
          f"tokens per text: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}; batch {args.batch}")
    text.encode(texts[: args.batch], args.batch)  # warm-up
    rows = []
    budget = text.token_budget()
    for name, run in (("given order", lambda: in_given_order(text, texts, args.batch)),
                      ("by length, 8192 tokens a batch", lambda: text.encode(texts, args.batch, 8192)),
                      (f"by length, {budget} tokens a batch (default)", lambda: text.encode(texts, args.batch))):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            feats = run()
            seconds = time.perf_counter() - t0
        rows.append((name, len(texts) / seconds, mem.peak, feats))
    diff = max((rows[0][3] - r[3]).abs().max().item() for r in rows[1:])
    print("| batches | texts/s | peak RSS MiB |\n|---|---|---|")
    for name, rate, peak, _ in rows:
        print(f"| {name} | {rate:.1f} | {peak:.0f} |")
    print(f"largest feature difference: {diff:.2e}")
    if diff > 1e-5:
        sys.exit("features differ by more than 1e-5")
    print(f"default / given order texts per second: {rows[2][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()

"""Optimiser steps per second: protext's training step vs the plain one, on a B/16-shaped CLIP or SigLIP.

The text tower is randomly initialised with the shape of CLIP ViT-B/16 (`--backbone clip`:
width 512, 12 layers, 8 heads, 77 tokens, 49,408 token ids, projection 512) or of SigLIP
B/16 (`--backbone siglip`: width 768, 12 layers, 12 heads, 64 tokens, 32,000 token ids,
head 768); batches are 256 (class, description) pairs drawn from the real CuPL ImageNet
descriptions. Both paths run the same prompted forward:

- fast:  what `protext train` does: cached targets, each distinct class in the batch encoded
         once, and for CLIP sequences cut to the longest in the batch (SigLIP's features
         depend on the padding, so its sequences stay 64 tokens);
- plain: targets re-encoded every step, one input per pair, every sequence at the full
         context (77 tokens for CLIP, 64 for SigLIP).

Each path runs in its own child process so that its peak memory can be read separately.
The last line printed is the ratio of steps per second, fast over plain.

    python benchmarks/train_speed.py [--backbone clip|siglip] [--fast-steps 10] [--plain-steps 2]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measure import PeakRSS, rss_mb  # noqa: E402

DESCRIPTIONS = ROOT.parent / "shared" / "data" / "descriptions" / "cupl" / "imagenet_prompts_base.json"
BATCH = 256
# The text tower each --backbone builds: (description, tiny builder, its keyword arguments).
SHAPES = {
    "clip": ("ViT-B/16-shaped text tower", "tiny_clip",
             dict(width=512, layers=12, heads=8, vocab_size=49408, context=77, projection=512)),
    "siglip": ("SigLIP-B/16-shaped text tower", "tiny_siglip",
               dict(width=768, layers=12, heads=12, vocab_size=32000, context=64, vision_heads=4)),  # tiny image tower
}


def build(device: str, shape: str):
    from protext import tiny
    from protext.descriptions import load_descriptions, pairs
    from protext.model import ProText

    data = load_descriptions(DESCRIPTIONS)
    classes, texts, cls_idx, txt_idx = pairs(data)
    # A word-level vocabulary from the descriptions themselves, so sequences are about as long
    # as real BPE / SentencePiece tokenizers make them.
    counts = Counter(w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower()))
    words = ["a", "photo", "of"] + [w for w, _ in counts.most_common(20000)]
    _, builder, config = SHAPES[shape]
    backbone = getattr(tiny, builder)(seed=0, words=words, **config).to(device)
    model = ProText.create(backbone, n_ctx=4, depth=9, seed=0)
    return backbone, model, classes, texts, cls_idx, txt_idx


def child(path: str, steps: int, device: str, shape: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from support import plain_loss

    from protext.training.train import TrainConfig, _autocast, batch_loss

    backbone, model, classes, texts, cls_idx, txt_idx = build(device, shape)
    cfg = TrainConfig(n_ctx=4, depth=9)
    opt = torch.optim.AdamW([model.prompts], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(cls_idx), generator=gen)[:BATCH] for _ in range(steps + 1)]
    cls_t = torch.tensor(cls_idx)
    extra = {}
    if path == "fast":
        t0 = time.perf_counter()
        needed = sorted({txt_idx[i] for b in batches for i in b.tolist()})
        feats = backbone.text.encode([texts[i] for i in needed])  # the one-time target cache
        row = {t: r for r, t in enumerate(needed)}
        extra["target_encoding_s"] = time.perf_counter() - t0
        extra["targets_encoded"] = len(needed)
        class_tokens = model.class_token_lists(classes)
        uniq = [len(set(cls_t[b].tolist())) for b in batches]
        extra["distinct_classes_per_batch"] = sum(uniq) / len(uniq)

        def step(b):
            targets = feats[torch.tensor([row[txt_idx[i]] for i in b.tolist()])].to(device)
            return batch_loss(model, class_tokens, cls_t[b], targets, cfg)
    else:
        def step(b):
            names = [classes[cls_idx[i]] for i in b.tolist()]
            descs = [texts[txt_idx[i]] for i in b.tolist()]
            return plain_loss(model, names, descs, cfg)

    autocast, _ = _autocast(cfg, torch.device(device))  # bf16 on CUDA, fp32 on the CPU, as `train` runs

    def run(b):
        with autocast:
            loss = step(b)
        opt.zero_grad()
        loss.backward()
        opt.step()

    run(batches[0])  # warm-up step, not timed
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mb()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for b in batches[1:]:
            run(b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # the steps are queued: time them to their end
        seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        extra["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {"path": path, "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "peak_rss_mb": mem.peak, "rss_before_steps_mb": base_rss, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast-steps", type=int, default=10)
    ap.add_argument("--plain-steps", type=int, default=2)
    ap.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available; bf16 there, as train runs)")
    ap.add_argument("--backbone", choices=sorted(SHAPES), default="clip", help="shape of the random text tower")
    ap.add_argument("--child", choices=["fast", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        steps = args.fast_steps if args.child == "fast" else args.plain_steps
        print(json.dumps(child(args.child, steps, args.device, args.backbone)))
        return
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    results = {}
    for path in ("fast", "plain"):
        cmd = [sys.executable, __file__, "--child", path, "--fast-steps", str(args.fast_steps),
               "--plain-steps", str(args.plain_steps), "--device", args.device, "--backbone", args.backbone]
        out = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), **_env()})
        if out.returncode != 0:
            sys.exit(out.stderr)
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    f, p = results["fast"], results["plain"]
    print(f"device: {where}, torch threads: {torch.get_num_threads()}, batch: {BATCH} pairs, "
          f"{SHAPES[args.backbone][0]}, n_ctx 4, depth 9")
    print(f"one-time target encoding (fast path): {f['targets_encoded']} descriptions in {f['target_encoding_s']:.1f} s")
    print(f"distinct classes per batch: {f['distinct_classes_per_batch']:.1f} of {BATCH}")
    print("| path | steps | steps/s | pairs/s | peak RSS during steps MiB | RSS before steps MiB |")
    print("|---|---|---|---|---|---|")
    for r in (f, p):
        print(f"| {r['path']} | {r['steps']} | {r['steps_per_s']:.3f} | {r['steps_per_s'] * BATCH:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_before_steps_mb']:.0f} |")
    if "peak_cuda_mb" in f:
        print(f"peak CUDA memory MiB: fast {f['peak_cuda_mb']:.0f}, plain {p['peak_cuda_mb']:.0f}")
    print(f"fast/plain steps per second: {f['steps_per_s'] / p['steps_per_s']:.2f}x")


def _env() -> dict:
    import os

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


if __name__ == "__main__":
    main()

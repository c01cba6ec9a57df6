"""Shared by the benchmark scripts: resident memory (this process's, its peak over a block, another's), a
free local port, and a ViT-B/16-shaped CLIP."""

from __future__ import annotations

import re
import resource
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IMAGENET_DESCRIPTIONS = SHARED / "descriptions" / "cupl" / "imagenet_prompts_base.json"


def rss_mb() -> float:
    """Resident memory now (Linux), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def process_rss_mib(pid: int) -> float:
    """Resident memory of another process (Linux), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server the benchmark starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRSS:
    """Samples resident memory every 10 ms in a thread; `.peak` is the highest seen."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


VIT_B16 = dict(width=512, layers=12, heads=8, vocab_size=49408, context=77, projection=512, vision_width=768,
               vision_layers=12, vision_heads=12, image_size=224, patch=16)


def _words(texts: list[str]) -> list[str]:
    counts = Counter(w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower()))
    return ["a", "photo", "of"] + [w for w, _ in counts.most_common(20000)]


def vit_b16_clip(texts: list[str], device: str = "cpu", folder: Path | None = None):
    """A random CLIP of ViT-B/16's shape (text: width 512, 12 layers, 8 heads, 77 tokens, 49,408 ids;
    image: width 768, 12 layers, 224 px, 16 px patches) whose tokenizer knows the 20,000 commonest
    words of `texts` as whole tokens, so sequences are about as long as real CLIP BPE makes them.
    With `folder`, it is saved there and loaded back (other processes can load it by that path)."""
    from protext.backbone import load_backbone
    from protext.tiny import save_tiny_clip, tiny_clip

    if folder is None:
        return tiny_clip(seed=0, words=_words(texts), **VIT_B16).to(device)
    save_tiny_clip(folder, seed=0, words=_words(texts), **VIT_B16)
    return load_backbone(str(folder), device=device)

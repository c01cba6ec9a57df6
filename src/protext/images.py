"""CLIP image preprocessing with PIL and NumPy (no torchvision).

resize the short side to `size` (bicubic), centre-crop `size` x `size`, scale to [0, 1],
normalise with the model's mean and std: the same numbers as `transformers`' CLIP image
processor (a test holds them to 1e-4). Any PIL mode is accepted: greyscale, palette,
RGBA, CMYK and 16-bit images are converted to 8-bit RGB first.

`load_pixels` is the one place that decides what an unusable image is: any failure to
open, decode or preprocess it (a corrupt or truncated file, a decompression bomb, running
out of memory) becomes `UnreadableImage`, which callers list as skipped instead of
losing every other result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class UnreadableImage(Exception):
    """An image that could not be turned into pixels; the message is "<error class>: <error>"."""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; 16- and 32-bit greyscale are scaled down, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A (3, size, size) float tensor, CLIP-normalised."""
    image = to_rgb(image)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = np.asarray(image, dtype=np.float32)[top : top + size, left : left + size] / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (so truncated files fail here, not later)."""
    with Image.open(path) as im:
        im.load()
        return im.copy()


def load_pixels(image: str | Path | Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`preprocess` of a file or PIL image; raises `UnreadableImage` for any failure.

    PIL fails in many ways besides OSError: DecompressionBombError for images over twice
    `Image.MAX_IMAGE_PIXELS`, SyntaxError and ValueError from some decoders, MemoryError for
    huge ones. One bad image must never cost the results of the others, so every Exception
    counts (KeyboardInterrupt and SystemExit still stop the run).
    """
    try:
        return preprocess(open_image(image) if isinstance(image, (str, Path)) else image, size, mean, std)
    except Exception as e:
        raise UnreadableImage(f"{e.__class__.__name__}: {e}") from e


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

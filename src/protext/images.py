"""Image preprocessing with PIL and NumPy (no torchvision), as each backbone's own processor does it.

The size rule says which (`Size`), and each gives the same numbers as that model's
`transformers` image processor (tests hold them to 1e-4):

- CLIP (`size` an int): resize the short side to `size` (bicubic), centre-crop `size` x `size`;
- SigLIP (`size` a (height, width) pair): resize straight to it (bicubic), no crop;
- SigLIP 2 NaFlex (`size` a `NaFlex`): resize (bilinear), aspect ratio kept, to the largest
  grid of whole patches that has at most `max_patches` of them, and return the patches.

then scale to [0, 1] and normalise with the model's mean and std. Any PIL mode is accepted:
greyscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB first.

`load_pixels` is the one place that decides what an unusable image is: any failure to
open, decode or preprocess it (a corrupt or truncated file, a decompression bomb, running
out of memory) becomes `UnreadableImage`, which callers list as skipped instead of
losing every other result.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

K = TypeVar("K")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# The raster formats decoded, in every command and in `serve`: PIL's other plugins are never
# tried (EPS would run Ghostscript, and a 70-byte looping EPS hangs it). JPEG includes MPO, the
# variant many phone cameras write.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
# Most pixels of one image, read from its header before it is decoded: a 40-megapixel RGB image
# takes 120 MB to decode, so decoding holds at most workers x that (`--max-pixels`).
MAX_PIXELS = 40_000_000


class UnreadableImage(Exception):
    """An image that could not be turned into pixels; the message is "<error class>: <error>"."""


class UnsupportedFormat(Exception):
    """A file that is none of the `FORMATS`."""


class TooManyPixels(Exception):
    """An image whose header declares more pixels than allowed."""


@dataclass(frozen=True)
class NaFlex:
    """SigLIP 2's native-resolution input: any aspect ratio, at most `max_patches` patches of
    `patch` x `patch` pixels.

    A preprocessed image is a fixed-shape (max_patches, 3·patch² + 2) tensor, so batches stack
    like square images: one row per patch, its pixels in `transformers`' order (row, column,
    channel) followed by the patch's (row, column) in the image's grid; padding rows are zeros
    with grid position (-1, -1). The image tower reads the mask and the grid's shape from them.
    """

    patch: int
    max_patches: int


# int: CLIP (short side, centre crop); (height, width): SigLIP (straight resize); NaFlex: SigLIP 2.
Size = int | tuple[int, int] | NaFlex


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


def preprocess(image: Image.Image, size: Size, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The model's input for one image: a normalised (3, H, W) tensor, or NaFlex patches (see `Size`)."""
    image = to_rgb(image)
    if isinstance(size, NaFlex):
        return _naflex_patches(image, size, mean, std)
    if isinstance(size, tuple):
        height, width = size
        return _normalise(np.asarray(_resized(image, width, height, Image.Resampling.BICUBIC)), mean, std)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = _resized(image, new_w, new_h, Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return _normalise(np.asarray(image)[top : top + size, left : left + size], mean, std)


def _resized(image: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample)


def _normalise(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) float32 from (H, W, 3) uint8: scaled to [0, 1], then (x - mean) / std."""
    arr = rgb.astype(np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _naflex_size(height: int, width: int, spec: NaFlex) -> tuple[int, int]:
    """The (height, width) in pixels a NaFlex model sees an image at: both multiples of the patch
    size (at least one patch), scaled alike from the original, for the largest scale whose grid
    has at most `max_patches` patches. Found by bisection on the scale, to the same precision
    (1e-5) as `transformers`' Siglip2ImageProcessor, so the sizes are the same."""
    def scaled(side: int, scale: float) -> int:
        return max(spec.patch, math.ceil(side * scale / spec.patch) * spec.patch)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        mid = (low + high) / 2
        if (scaled(height, mid) / spec.patch) * (scaled(width, mid) / spec.patch) <= spec.max_patches:
            low = mid
        else:
            high = mid
    return scaled(height, low), scaled(width, low)


def _naflex_patches(image: Image.Image, spec: NaFlex, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    height, width = _naflex_size(image.height, image.width, spec)
    pixels = _normalise(np.asarray(_resized(image, width, height, Image.Resampling.BILINEAR)), mean, std)
    p, rows, cols = spec.patch, height // spec.patch, width // spec.patch
    patches = pixels.reshape(3, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(rows * cols, p * p * 3)
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).reshape(rows * cols, 2).float()
    out = torch.zeros(spec.max_patches, p * p * 3 + 2)
    out[:, -2:] = -1.0
    out[: rows * cols] = torch.cat([patches, grid], dim=1)
    return out


def views(image: Image.Image, size: Size, mean: Sequence[float], std: Sequence[float], count: int,
          seed: int = 0) -> torch.Tensor:
    """The image and `count` augmented views of it, (1 + count, 3, H, W), as AWT makes them: view 0 is
    the model's own preprocessing; each other view a random resized crop of the raw image (8-100% of its
    area, aspect ratio 3/4-4/3, resized bilinearly to the input size) flipped left-right half the time.
    The random numbers come from `seed` and the image's pixels, so the same image always gets the same
    views, whatever its file is called and wherever it is classified."""
    if isinstance(size, NaFlex):
        raise ValueError("augmented views need a fixed input size; SigLIP 2 NaFlex takes any shape")
    image = to_rgb(image)
    height, width = (size, size) if isinstance(size, int) else size
    digest = int.from_bytes(hashlib.sha1(image.tobytes()).digest()[:8], "little")
    rng = np.random.default_rng([seed, digest])
    out = [preprocess(image, size, mean, std)]
    for _ in range(count):
        left, top, w, h = _random_crop(image.width, image.height, rng)
        crop = image.crop((left, top, left + w, top + h)).resize((width, height), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(_normalise(np.asarray(crop), mean, std))
    return torch.stack(out)


def _random_crop(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random crop, by the usual random-resized-crop rule: ten tries at
    an area and an aspect ratio that fit, else the whole image at the nearest allowed ratio."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else (round(height * ratio[1]), height) \
        if aspect > ratio[1] else (width, height)
    return (width - w) // 2, (height - h) // 2, w, h


def is_uri(path: str | Path) -> bool:
    """s3://..., gs://..., file://...: read through pyarrow's filesystems, not as a local path."""
    return isinstance(path, str) and "://" in path


@functools.lru_cache(maxsize=64)
def _filesystem(root: str):
    """pyarrow's filesystem for a URI's scheme and host (bucket), made once: making one can
    cost a request (S3 looks up the bucket's region), which must not happen per image."""
    try:
        from pyarrow import fs
    except ImportError as e:
        raise ImportError(f"reading {root}... needs pyarrow: pip install 'protext[parquet]'") from e
    return fs.FileSystem.from_uri(root)


def uri_location(uri: str):
    """(pyarrow filesystem, path inside it) of a URI."""
    parts = urlsplit(uri)
    filesystem, base = _filesystem(f"{parts.scheme}://{parts.netloc}/")  # base: "bucket" on S3, "/" locally
    base = base.strip("/")
    inner = parts.path.lstrip("/")
    return filesystem, f"{base}/{inner}" if base else f"/{inner}"


def read_uri(uri: str) -> bytes:
    filesystem, inner = uri_location(uri)
    with filesystem.open_input_file(inner) as f:
        return f.read()


def list_uri_images(uri: str) -> list[str] | None:
    """The image files below a URI that names a folder (prefix), sorted; None when it names a file."""
    from pyarrow import fs

    filesystem, inner = uri_location(uri)
    if filesystem.get_file_info(inner).type != fs.FileType.Directory:
        return None
    infos = filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
    root = uri.rstrip("/")
    return sorted(root + "/" + i.path[len(inner.rstrip("/")) :].lstrip("/") for i in infos
                  if i.type == fs.FileType.File and Path(i.path).suffix.lower() in IMAGE_SUFFIXES)


@functools.lru_cache(maxsize=1)
def _decodable() -> tuple[str, ...]:
    """The `FORMATS` this Pillow build has plugins for (WebP, for one, is optional)."""
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def open_header(source: str | Path | io.BytesIO, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image opened but not decoded: its format checked against `FORMATS` and its size, from
    the header, against `max_pixels`, so neither a foreign format nor a bomb reaches a decoder."""
    try:
        image = Image.open(source, formats=_decodable())
    except Image.UnidentifiedImageError as e:
        raise UnsupportedFormat(f"not an image in a format protext reads ({', '.join(FORMATS)})") from e
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise TooManyPixels(f"{width} x {height} = {width * height} pixels, more than the limit of {max_pixels} "
                            f"(--max-pixels)")
    return image


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file (so truncated files fail here, not later).

    A URI is read with pyarrow's filesystems (S3, GCS, HDFS, ... when pyarrow and the
    filesystem's packages and credentials are present), so a cluster can label a bucket."""
    source = io.BytesIO(read_uri(path)) if is_uri(path) else path
    with open_header(source, max_pixels) as im:
        im.load()
        return im.copy()


def load_pixels(image: str | Path | Image.Image, size: Size, mean: Sequence[float], std: Sequence[float],
                max_pixels: int = MAX_PIXELS, augment: tuple[int, int] | None = None) -> torch.Tensor:
    """`preprocess` of a file or PIL image; raises `UnreadableImage` for any failure.

    PIL fails in many ways besides OSError: DecompressionBombError for images over twice
    `Image.MAX_IMAGE_PIXELS`, SyntaxError and ValueError from some decoders, MemoryError for
    huge ones. One bad image must never cost the results of the others, so every Exception
    counts (KeyboardInterrupt and SystemExit still stop the run).
    """
    try:
        if isinstance(image, (str, Path)):
            image = open_image(image, max_pixels)
        elif not isinstance(image, Image.Image):  # a row of a dataset, read now (`hub_datasets.HubImage`)
            image = image.open()
            if image.size[0] * image.size[1] > max_pixels:
                raise TooManyPixels(f"{image.size[0]} x {image.size[1]} pixels, more than the limit of {max_pixels} "
                                    f"(--max-pixels)")
        if augment is not None:  # (views, seed): the image and its augmented views (`views`)
            return views(image, size, mean, std, augment[0], augment[1])
        return preprocess(image, size, mean, std)
    except Exception as e:
        raise UnreadableImage(f"{e.__class__.__name__}: {e}") from e


def pixels_of(item: str | Path | Image.Image | torch.Tensor, size: Size, mean: Sequence[float],
              std: Sequence[float], max_pixels: int = MAX_PIXELS,
              augment: tuple[int, int] | None = None) -> torch.Tensor | str:
    """The model's input for one item (a file, a URI, a PIL image, or pixels already preprocessed),
    or the reason it is unreadable."""
    if isinstance(item, torch.Tensor):
        return item
    try:
        return load_pixels(item, size, mean, std, max_pixels, augment)
    except UnreadableImage as e:
        return str(e)


def decode_ahead(items: Iterable[tuple[K, str | Path | Image.Image | torch.Tensor]], size: Size,
                 mean: Sequence[float], std: Sequence[float], workers: int, window: int,
                 max_pixels: int = MAX_PIXELS, augment: tuple[int, int] | None = None
                 ) -> Iterator[tuple[K, torch.Tensor | str]]:
    """(key, pixels or the reason the image is unreadable) for each (key, item), in order, decoded in
    `workers` threads at most `window` images ahead: decoding overlaps the model (PIL and torch
    release the GIL) and memory stays flat however many items there are, even from a stream."""
    with ThreadPoolExecutor(workers, thread_name_prefix="protext-decode") as pool:
        pending: deque[tuple[K, Future]] = deque()
        upcoming = iter(items)
        for key, item in upcoming:
            pending.append((key, pool.submit(pixels_of, item, size, mean, std, max_pixels, augment)))
            if len(pending) >= window:
                break
        while pending:
            key, future = pending.popleft()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(pixels_of, nxt[1], size, mean, std, max_pixels, augment)))
            yield key, future.result()


def list_images(folder: Path, notes: list[str] | None = None) -> list[Path]:
    """The image files below `folder`, sorted, following links to folders (each folder once, so a link
    back up cannot loop); what was skipped (dangling links, loops) is added to `notes`."""
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(root)
        seen.add((st.st_dev, st.st_ino))
        for d in list(dirs):
            try:
                sub = os.stat(os.path.join(root, d))
            except OSError:  # a dangling link to a folder
                dirs.remove(d)
                continue
            if (sub.st_dev, sub.st_ino) in seen:
                dirs.remove(d)
                if notes is not None:
                    notes.append(f"{os.path.join(root, d)}: a link to a folder already listed (a loop); skipped")
        for name in names:
            path = Path(root) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.is_file():
                found.append(path)
            elif notes is not None:
                notes.append(f"{path}: a link to nothing (dangling); skipped")
    return sorted(found)

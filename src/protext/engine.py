"""The image job: inputs listed, decoded ahead in threads, batched through the image tower, in parts.

Every command that reads images goes through here: `label`, `features`, `eval`'s feature cache,
`ProTextClassifier.predict`, and (its decoding and part rule) the Ray engine. One path means one
set of rules for what an input is, what an unreadable image is, how images are batched and what
a rerun resumes from.

- `collect` lists inputs: image files, folders (recursive), CSV lists of paths, URIs.
- `run` turns spans of inputs, (part index, items), into `Part`s: decoding runs in threads a
  bounded window ahead of the model (PIL and torch release the GIL), readable images are batched
  (at most `batch_size`, never across two parts) through the image tower, and an optional `head`
  scores each batch as it comes out (`label` turns features into probabilities there).
- `run_job` is the resumable job of `label` and `features` on one machine: the parts a
  `parts.PartFolder` lacks are computed and each is saved, atomically, as soon as it is done.

The unit a rerun resumes from is the part: part N holds inputs N*part_size .. (N+1)*part_size-1,
the same on both engines.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import torch
from PIL import Image

from .backbone import Backbone
from .context import Context
from .errors import ProtextError
from .images import IMAGE_SUFFIXES, MAX_PIXELS, decode_ahead, is_uri, list_images, list_uri_images, read_uri
from .parts import PartFolder

Item = str | Path | Image.Image | torch.Tensor
MAX_LISTED = 10_000  # unreadable inputs a report names (it counts them all)


# -- listing inputs -----------------------------------------------------------------------

def collect(inputs: Sequence[str | Path], notes: list[str] | None = None) -> list[str | Path]:
    """Image paths from folders (recursive), files, CSV files listing paths, and URIs.

    A CSV's paths are its `path` column when a header row names one, else its first column;
    relative paths are relative to the CSV. URIs (s3://bucket/key.jpg, gs://..., file://...)
    work the same way, in the arguments or a CSV, through pyarrow's filesystems: an image URI
    stays a string, read later (`images.open_image`); a CSV URI is read and a folder URI
    (prefix) listed here. Paths appear once, in the order first given. A path that does not
    exist is kept: it is reported as unreadable, like any other bad file. Links to folders are
    followed; dangling and looping links are skipped and said in `notes`.
    """
    paths: list[str | Path] = []
    for item in inputs:
        if is_uri(str(item)):
            paths.extend(_uri_paths(str(item)))
            continue
        item = Path(item)
        if item.is_dir():
            found = list_images(item, notes)
            if not found:
                raise ProtextError(f"{item}: no image files in this folder or below")
            paths.extend(found)
        elif item.suffix.lower() == ".csv":
            paths.extend(_csv_paths(item))
        else:
            paths.append(item)
    return list(dict.fromkeys(paths))


def _uri_paths(uri: str) -> list[str]:
    """A URI: one image (by its suffix; read later, so a missing one is a row, not a stop), a
    CSV list of paths (relative ones relative to it, absolute ones on its filesystem), or a
    folder (prefix) searched recursively."""
    if Path(urlsplit(uri).path).suffix.lower() in IMAGE_SUFFIXES:
        return [uri]
    try:
        if uri.lower().endswith(".csv"):
            text = read_uri(uri).decode("utf-8-sig")
            parts = urlsplit(uri)
            return [p if is_uri(p) else f"{parts.scheme}://{parts.netloc}{p}" if p.startswith("/")
                    else f"{uri.rsplit('/', 1)[0]}/{p}" for p in _csv_rows(text, uri)]
        found = list_uri_images(uri)
    except ProtextError:
        raise
    except Exception as e:  # missing pyarrow or filesystem packages, credentials, network
        raise ProtextError(f"{uri}: cannot be listed or read ({e.__class__.__name__}: {e})") from e
    if found == []:
        raise ProtextError(f"{uri}: no image files below this folder")
    return [uri] if found is None else found


def _csv_paths(path: Path) -> list[str | Path]:
    if not path.is_file():
        raise ProtextError(f"{path}: no such CSV file (expected a list of image paths)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProtextError(f"{path}: not a readable UTF-8 CSV file ({e})") from e
    return [p if is_uri(p) else path.parent / p for p in _csv_rows(text, path)]


def _csv_rows(text: str, path: Path | str) -> list[str]:
    """The paths a CSV lists: its `path` column when a header names one, else its first."""
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if "".join(row).strip()]
    except csv.Error as e:
        raise ProtextError(f"{path}: not a readable UTF-8 CSV file ({e})") from e
    column = 0
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        column = [c.strip().lower() for c in rows[0]].index("path")
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows) if len(row) <= column or not row[column].strip()]
    if bad:
        raise ProtextError(f"{path}: row {bad[0] + 1} of the data has no path in column {column + 1}")
    return [row[column].strip() for row in rows]


# -- images through the tower ----------------------------------------------------------------

@dataclass
class Part:
    """One part of a job: its inputs' `features` (n, dim), zero rows where `errors` gives the
    reason an input is unreadable, and the `head`'s output for them (same rule), if any."""

    index: int
    items: list[Item]
    features: torch.Tensor
    errors: list[str | None]
    scores: torch.Tensor | None = None

    @property
    def unreadable(self) -> int:
        return sum(e is not None for e in self.errors)


def default_workers(workers: int | None) -> int:
    """Decoding threads: as given, else the CPU count, at most 8."""
    return workers or min(8, os.cpu_count() or 1)


CPU_BATCH, GPU_BATCH = 32, 256


def default_batch_size(batch_size: int | None, device: torch.device | str) -> int:
    """Images per forward pass: as given, else 32 on the CPU (larger batches gain nothing there and
    hold more memory) and 256 on a GPU (a ViT-B/16 needs that many to fill one)."""
    return batch_size or (GPU_BATCH if torch.device(device).type == "cuda" else CPU_BATCH)


def run(backbone: Backbone, spans: Iterable[tuple[int, Sequence[Item]]], batch_size: int | None = None,
        workers: int | None = None, head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        progress: Callable[[int], None] | None = None, max_pixels: int = MAX_PIXELS,
        augment: tuple[int, int] | None = None) -> Iterator[Part]:
    """A `Part` per (index, items) span, in order; see the module's docstring. With `augment`, (views,
    seed), each image is also seen in that many augmented views (`images.views`, for AWT): features
    are then (n, 1 + views, dim), and a batch holds `batch_size` tower inputs, views counted.

    On a GPU, each batch goes from pinned memory with a non-blocking copy, so the next batch's
    decoding (in the threads) and its copy overlap the forward pass."""
    tower = backbone.image
    if tower is None:
        raise ProtextError(f"backbone '{backbone.name}' has no image tower; images need a CLIP or SigLIP")
    device = tower.device
    cuda = device.type == "cuda"
    batch_size = default_batch_size(batch_size, device)
    workers = default_workers(workers)
    dim = backbone.text.feature_dim
    shape = (dim,) if augment is None else (1 + augment[0], dim)
    if augment is not None:
        batch_size = max(1, batch_size // (1 + augment[0]))

    def keyed() -> Iterator[tuple[tuple[Part, int], Item]]:
        for index, items in spans:
            items = list(items)
            part = Part(index, items, torch.zeros(len(items), *shape), [None] * len(items))
            if not items:
                yield (part, -1), None  # an empty span still comes out as a part
            for j, item in enumerate(items):
                yield (part, j), item

    batch: list[tuple[int, torch.Tensor]] = []

    def flush(part: Part) -> None:
        pixels = torch.stack([p for _, p in batch])
        pixels = pixels.flatten(0, 1) if augment else pixels
        feats = tower(pixels.pin_memory().to(device, non_blocking=True) if cuda else pixels.to(device))
        feats = feats.float().cpu().view(len(batch), *shape)
        rows = [j for j, _ in batch]
        part.features[rows] = feats
        if head is not None:
            scores = head(feats)
            if part.scores is None:
                part.scores = torch.zeros(len(part.items), scores.shape[1], dtype=scores.dtype)
            part.scores[rows] = scores
        batch.clear()

    for (part, j), result in decode_ahead(keyed(), tower.image_size, tower.mean, tower.std, workers,
                                          window=2 * batch_size + workers, max_pixels=max_pixels, augment=augment):
        if j >= 0:
            if isinstance(result, str):
                part.errors[j] = result
            else:
                batch.append((j, result))
                if len(batch) == batch_size:
                    flush(part)
            if progress:
                progress(1)
        if j == len(part.items) - 1:
            if batch:
                flush(part)
            yield part


def spans(count: int, part_size: int) -> list[range]:
    """The input positions of each part of a job of `count` inputs."""
    return [range(i * part_size, min(count, (i + 1) * part_size)) for i in range(math.ceil(count / part_size))]


# -- the resumable job of label and features ---------------------------------------------------

@dataclass
class JobReport:
    """What a job did: `processed` now, `reused` from parts an earlier run wrote; the unreadable
    inputs counted, the first `MAX_LISTED` of them named with the reason."""

    output: Path
    images: int
    processed: int
    reused: int
    unreadable: int = 0
    unreadable_files: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"output": str(self.output), "images": self.images, "processed": self.processed,
                "reused": self.reused, "unreadable": self.unreadable, "seconds": round(self.seconds, 2),
                "images_per_s": round(self.processed / self.seconds, 2) if self.seconds > 0 else None}

    def note(self, name: str, reason: str | None) -> None:
        if reason is not None:
            self.unreadable += 1
            if len(self.unreadable_files) < MAX_LISTED:
                self.unreadable_files.append((name, reason))


def check_counts(counts: dict[str, int | None]) -> None:
    """Each flag -> value at least 1 (None: not given), before any work starts."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ProtextError(f"{name} must be at least 1, got {value}")


def run_job(backbone: Backbone, names: Sequence[str], folder: PartFolder, part_size: int,
            encode: Callable[[Part, list[str]], bytes], *, items: Sequence[Item] | None = None,
            batch_size: int | None = None, workers: int | None = None,
            head: Callable[[torch.Tensor], torch.Tensor] | None = None, ctx: Context = Context(),
            desc: str = "images", max_pixels: int = MAX_PIXELS,
            augment: tuple[int, int] | None = None) -> tuple[int, int, float]:
    """Compute the parts `folder` lacks and save each with `encode(part, its names)`; returns
    (images processed, images reused, seconds). `items` are what is decoded (default: the names,
    as paths or URIs; a dataset's rows otherwise)."""
    items = names if items is None else items
    layout = spans(len(names), part_size)
    work = [(i, layout[i]) for i in folder.missing(range(len(layout)))]
    processed = sum(len(r) for _, r in work)
    started = time.perf_counter()
    with ctx.bar(processed, desc, "img", show=processed > 0) as bar:
        for part in run(backbone, ((i, [items[k] for k in r]) for i, r in work), batch_size, workers, head,
                        bar.update, max_pixels, augment):
            names_here = [names[k] for k in layout[part.index]]
            folder.write(part.index, encode(part, names_here), len(names_here), part.unreadable)
    return processed, len(names) - processed, time.perf_counter() - started

"""The image job: inputs listed, decoded ahead in threads, batched through the image tower, in parts.

Every command that reads images goes through here: `label`, `features`, `eval`'s feature cache,
`ProTextClassifier.predict`, and (its decoding and part rule) the Ray engine. One path means one
set of rules for what an input is, what an unreadable image is, how images are batched and what
a rerun resumes from.

- `inputs.collect` lists inputs: image files, folders (recursive), CSV lists of paths, URIs.
- `run` turns spans of inputs, (part index, items), into `Part`s: decoding runs in threads a
  bounded window ahead of the model (PIL and torch release the GIL), readable images are batched
  (at most `batch_size`, never across two parts) through the image tower, and an optional `head`
  scores each batch as it comes out (`label` turns features into probabilities there).
- `run_job` is the resumable job of `label` and `features` on one machine: the parts its
  `parts.PartFolder`s lack are computed (their inputs read from `inputs.ListInputs` or an
  `inputs.Manifest` a part at a time) and each is saved, atomically, as soon as it is done: one
  forward pass can fill two folders (`label --save-features`).

The unit a rerun resumes from is the part: part N holds inputs N*part_size .. (N+1)*part_size-1,
the same on both engines.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from .backbone import Backbone
from .context import Context
from .errors import ProtextError
from .images import MAX_PIXELS, decode_ahead
from .inputs import Inputs, PartInputs, parts_of
from .parts import PartFolder

Item = str | Path | Image.Image | torch.Tensor
Encoder = Callable[["Part", PartInputs], bytes]  # a computed part -> the bytes of its file in one folder
MAX_LISTED = 10_000  # unreadable inputs a report names (it counts them all)


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


def parts_to_compute(inputs: Inputs, folders: Sequence[PartFolder], part_size: int) -> tuple[list[int], int]:
    """The parts that any of `folders` lacks, in order, and how many inputs they hold (both engines)."""
    count = parts_of(inputs, part_size)
    work = sorted(set().union(*(folder.missing(range(count)) for folder in folders)))
    return work, sum(min(part_size, inputs.images - i * part_size) for i in work)


def run_job(backbone: Backbone, inputs: Inputs, outputs: Sequence[tuple[PartFolder, Encoder]],
            part_size: int, *, batch_size: int | None = None, workers: int | None = None,
            head: Callable[[torch.Tensor], torch.Tensor] | None = None, ctx: Context = Context(),
            desc: str = "images", max_pixels: int = MAX_PIXELS, augment: tuple[int, int] | None = None,
            notes: JobReport | None = None) -> tuple[int, int, float]:
    """Compute the parts that any of the `outputs` folders lacks, and save each into every folder that
    lacks it with that folder's `encode(part, its inputs)`; returns (images processed, images
    reused, seconds). Each part's inputs are read (`inputs.part`) only when it is computed, so
    memory holds the parts in flight, never the whole input. `notes` counts (and names) the
    unreadable inputs of the parts computed."""
    work, processed = parts_to_compute(inputs, [folder for folder, _ in outputs], part_size)
    started = time.perf_counter()
    given: dict[int, PartInputs] = {}

    def parts() -> Iterator[tuple[int, list[Item]]]:
        for i in work:
            given[i] = inputs.part(i, part_size)
            yield i, given[i].items

    with ctx.bar(processed, desc, "img", show=processed > 0) as bar:
        for part in run(backbone, parts(), batch_size, workers, head, bar.update, max_pixels, augment):
            here = given.pop(part.index)
            if notes is not None:
                for name, reason in zip(here.names, part.errors):
                    notes.note(name, reason)
            for folder, encode in outputs:
                if not folder.done(part.index):
                    folder.write(part.index, encode(part, here), len(here.names), part.unreadable)
    return processed, inputs.images - processed, time.perf_counter() - started

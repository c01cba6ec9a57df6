"""`protext features`: the image features of many files, into a folder of Parquet parts.

For collections too large to embed twice: compute the image tower's features once (here, or
on a Ray cluster with `distributed.features_on_ray`), then label them with any number of
label sets (`protext label --features DIR`), search them, or load them elsewhere.

The folder (`--out`) holds:

- `part-NNNNNN.parquet`: the features of input positions N*chunk .. (N+1)*chunk-1, in input
  order, one row each: `path` (string), `feature` (L2-normalised float32, fixed size; null when
  unreadable) and `error` (the reason, else null). Each part is written atomically.
- `_settings.json`: what decides the parts (backbone, image-tower fingerprint, chunk, the path
  list's hash), written first. A rerun with the same settings computes only the missing
  parts; a rerun with other settings is refused before any image is read.
- `_summary.json`: the summary, written last: its presence means the folder is finished.

Any Parquet reader takes the folder as one table (`pyarrow.parquet.read_table(DIR)`,
`pandas.read_parquet(DIR)`, DuckDB's `read_parquet('DIR/*.parquet')`, Spark, Ray Data: the
names starting with "_" are skipped); `read_features` returns it as tensors. Both engines
cut the inputs into the same parts, so their folders hold the same rows (features equal up
to float rounding of other batch shapes).
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .backbone import Backbone
from .cache import atomic_write_bytes, atomic_write_json, settings_change, sha1
from .errors import ProtextError
from .images import decode_ahead

FORMAT = 1
SETTINGS_FILE = "_settings.json"  # names starting with "_" are skipped by Parquet readers given the folder
SUMMARY_FILE = "_summary.json"


def pyarrow_modules():
    """pyarrow and its Parquet module, or an error that says how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ProtextError("feature folders are Parquet files and need pyarrow: pip install 'protext[parquet]'") from e
    return pa, pq


@dataclass
class FeaturesReport:
    """What a run did: parts `computed` now and `reused` from an earlier run; `unreadable` (path, reason)."""

    out: Path
    images: int
    computed: int
    reused: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"out": str(self.out), "images": self.images, "computed": self.computed, "reused": self.reused,
                "unreadable": len(self.unreadable), "seconds": round(self.seconds, 2),
                "images_per_s": round(self.computed / self.seconds, 2) if self.seconds > 0 else None}


class FeatureFolder:
    """The output folder of a features job: its settings, its finished parts, its summary."""

    def __init__(self, out: Path, settings: dict):
        self.out, self.settings = Path(out), settings
        if self.out.exists() and not self.out.is_dir():
            raise ProtextError(f"--out {self.out} is a file; --out names the folder the feature parts are written into")
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(".part-*.tmp"):  # left by a writer killed mid-part
            stale.unlink(missing_ok=True)
        saved = self.out / SETTINGS_FILE
        parts = any(self.out.glob("part-*.parquet"))
        change = settings_change(saved, settings, self.out) if parts else None
        if change is not None:
            earlier, differ = change
            if {"images", "paths_sha1"} & set(differ):
                raise ProtextError(f"{self.out} holds features of another list of images ({earlier.get('images')} "
                                   f"images then, {settings['images']} now, or the same number in another order): "
                                   f"give the same inputs to finish it, or another --out")
            if differ:
                raise ProtextError(f"{self.out} holds features made with other settings ({', '.join(differ)} differ: "
                                   f"{', '.join(f'{k} {earlier.get(k)!r}' for k in differ)} then): rerun with those, "
                                   f"or give another --out")
        elif parts and not saved.is_file():
            raise ProtextError(f"{self.out} holds part-*.parquet files that protext features did not write (no "
                               f"{SETTINGS_FILE}); give a new or empty --out")
        else:
            atomic_write_json(saved, settings)
        self.chunk, self.images = settings["chunk"], settings["images"]
        self.dim = settings["dim"]

    @property
    def parts(self) -> int:
        return math.ceil(self.images / self.chunk)

    def span(self, part: int) -> range:
        """The input positions of one part."""
        return range(part * self.chunk, min(self.images, (part + 1) * self.chunk))

    def path(self, part: int) -> Path:
        return self.out / f"part-{part:06d}.parquet"

    def missing(self) -> list[int]:
        return [i for i in range(self.parts) if not self.path(i).is_file()]

    def write(self, part: int, paths: Sequence[str], feats: np.ndarray, errors: Sequence[str | None]) -> None:
        """One part, atomically: `feats` (n, dim) float32, ignored where `errors` has a reason."""
        pa, pq = pyarrow_modules()
        if len(paths) != len(self.span(part)) or feats.shape != (len(paths), self.dim):
            raise ProtextError(f"part {part}: {len(paths)} paths and features {feats.shape}, expected "
                               f"{len(self.span(part))} of dimension {self.dim}")
        values = pa.array(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1))
        mask = pa.array([e is not None for e in errors])
        column = pa.FixedSizeListArray.from_arrays(values, self.dim, mask=mask)
        table = pa.table({"path": pa.array(list(paths), pa.string()), "feature": column,
                          "error": pa.array(list(errors), pa.string())})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        atomic_write_bytes(self.path(part), sink.getvalue())

    def finish(self, started: float, computed: int, reused: int) -> FeaturesReport:
        """Check every part is there, write the summary, and report."""
        _, pq = pyarrow_modules()
        if self.missing():
            raise ProtextError(f"{self.out}: parts {self.missing()[:5]} are missing; rerun the same command")
        unreadable = []
        for part in range(self.parts):
            rows = pq.read_table(self.path(part), columns=["path", "error"]).to_pydict()
            unreadable += [(p, e) for p, e in zip(rows["path"], rows["error"]) if e is not None]
        summary = {**self.settings, "parts": self.parts, "unreadable": len(unreadable)}
        atomic_write_json(self.out / SUMMARY_FILE, summary)
        return FeaturesReport(self.out, self.images, computed, reused, unreadable, time.perf_counter() - started)


def start_features(backbone: Backbone, paths: Sequence[str | Path], out: Path, chunk: int,
                   counts: dict[str, int]) -> tuple[list[str], FeatureFolder]:
    """Check a features job's arguments before any image is read (`counts`: flag -> value, each at
    least 1) and open its folder; the single-machine and the Ray paths both start here."""
    pyarrow_modules()
    if backbone.image is None:
        raise ProtextError(f"backbone '{backbone.name}' has no image tower")
    for name, value in {"--chunk": chunk, **counts}.items():
        if value < 1:
            raise ProtextError(f"{name} must be at least 1, got {value}")
    names = [str(p) for p in paths]
    if not names:
        raise ProtextError("no images to compute features of")
    settings = {"format": FORMAT, "backbone": backbone.name, "revision": backbone.revision,
                "image_tower": backbone.image.fingerprint(), "dim": backbone.text.feature_dim, "chunk": chunk,
                "images": len(names), "paths_sha1": sha1("\n".join(names))}
    return names, FeatureFolder(out, settings)


def write_features(backbone: Backbone, paths: Sequence[str | Path], out: str | Path, batch_size: int = 32,
                   workers: int | None = None, chunk: int = 1024, show_progress: bool = True) -> FeaturesReport:
    """Image features of every path into the folder `out`, one Parquet part per `chunk` inputs;
    resumes a killed run (see the module's docstring). Unreadable files are rows with an error."""
    from tqdm.auto import tqdm

    names, folder = start_features(backbone, paths, Path(out), chunk,
                                   {"--batch-size": batch_size, "--workers": 1 if workers is None else workers})
    todo = folder.missing()
    workers = workers or min(8, os.cpu_count() or 1)
    tower, device = backbone.image, backbone.device
    started = time.perf_counter()
    images = sum(len(folder.span(p)) for p in todo)
    with tqdm(total=images, desc="image features", unit="img", disable=not show_progress or not todo) as bar:
        for part in todo:
            paths_here = [names[i] for i in folder.span(part)]
            feats = np.zeros((len(paths_here), folder.dim), np.float32)
            errors: list[str | None] = [None] * len(paths_here)
            batch: list[tuple[int, torch.Tensor]] = []
            decoded = decode_ahead(paths_here, tower.image_size, tower.mean, tower.std, workers, 2 * batch_size + workers)
            for i, result in decoded:
                if isinstance(result, str):
                    errors[i] = result
                else:
                    batch.append((i, result))
                if len(batch) == batch_size or (i == len(paths_here) - 1 and batch):
                    out_feats = tower(torch.stack([p for _, p in batch]).to(device)).cpu().numpy()
                    feats[[j for j, _ in batch]] = out_feats
                    batch = []
                bar.update(1)
            folder.write(part, paths_here, feats, errors)
    return folder.finish(started, images, len(names) - images)


@dataclass
class StoredFeatures:
    """A finished feature folder: `paths` in input order, `feats` (n, dim) with zero rows where
    `errors` gives the reason an image was unreadable, and the folder's summary `info`."""

    paths: list[str]
    feats: torch.Tensor
    errors: list[str | None]
    info: dict

    def check(self, backbone: Backbone) -> None:
        """Refuse to use these features with another image tower than the one that made them."""
        if backbone.image is None or backbone.image.fingerprint() != self.info["image_tower"]:
            raise ProtextError(f"the features were made by the image tower of '{self.info['backbone']}' "
                               f"({self.info['image_tower']}); '{backbone.name}' has other image weights: pass "
                               f"--backbone {self.info['backbone']} or compute the features again")


def read_features(folder: str | Path) -> StoredFeatures:
    """A finished feature folder as tensors."""
    import json

    _, pq = pyarrow_modules()
    folder = Path(folder)
    summary = folder / SUMMARY_FILE
    if not summary.is_file():
        what = "an unfinished feature folder: rerun the protext features command that made it" \
            if (folder / SETTINGS_FILE).is_file() else "not a feature folder (made by protext features)"
        raise ProtextError(f"{folder}: {what}")
    info = json.loads(summary.read_text(encoding="utf-8"))
    feats = np.zeros((info["images"], info["dim"]), np.float32)
    paths: list[str] = []
    errors: list[str | None] = []
    for i in range(info["parts"]):  # one part in memory at a time, beside the result
        table = pq.read_table(folder / f"part-{i:06d}.parquet")
        column = table.column("feature").combine_chunks()
        valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False))
        feats[len(paths) : len(paths) + len(table)][valid] = column.flatten().to_numpy().reshape(-1, info["dim"])
        paths += table.column("path").to_pylist()
        errors += table.column("error").to_pylist()
        del table, column
    return StoredFeatures(paths, torch.from_numpy(feats), errors, info)

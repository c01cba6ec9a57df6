"""`protext features`: the image features of many files, into a folder of Parquet parts.

For collections too large to embed twice: compute the image tower's features once (here, or
on a Ray cluster with `distributed.features_on_ray`), then label them with any number of
label sets (`protext label --features DIR`), search them, or load them elsewhere.

The folder (`--out`) is a `parts.PartFolder` of Parquet parts, one row per input: `path`
(string), `feature` (L2-normalised float32, fixed size; null when unreadable) and `error` (the
reason, else null); `_settings.json` (backbone, image-tower fingerprint, the tower's precision,
part size, the path list's hash) first, `_summary.json` last. Any Parquet reader takes the folder as one table
(`pyarrow.parquet.read_table(DIR)`, `pandas.read_parquet(DIR)`, DuckDB's
`read_parquet('DIR/*.parquet')`, Spark, Ray Data); `read_features` returns it as tensors,
`open_features` one part at a time. Both engines cut the inputs into the same parts, so their
folders hold the same rows (features equal up to float rounding of other batch shapes).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .backbone import Backbone
from .context import Context
from .engine import MAX_LISTED, JobReport, Part, check_counts, run_job
from .errors import ProtextError
from .images import MAX_PIXELS
from .inputs import Inputs, PartInputs, as_inputs
from .parts import PartFolder


def pyarrow_modules():
    """pyarrow and its Parquet module, or an error that says how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ProtextError("feature folders are Parquet files and need pyarrow: pip install 'protext[parquet]'") from e
    return pa, pq


def part_bytes(names: Sequence[str], feats: np.ndarray, errors: Sequence[str | None], dim: int,
               extras: dict[str, list] | None = None, columns: dict[str, str] | None = None) -> bytes:
    """One Parquet part: `feats` (n, dim) float32, null where `errors` has a reason; then the inputs'
    carried `extras` (column -> values), typed by `columns` (column -> type)."""
    pa, pq = pyarrow_modules()
    if feats.shape != (len(names), dim):
        raise ProtextError(f"{len(names)} paths and features of shape {feats.shape}, expected dimension {dim}")
    values = pa.array(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1))
    mask = pa.array([e is not None for e in errors])
    column = pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)
    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
    carried = {("input_" + c if c in ("path", "feature", "error") else c): pa.array(extras[c], types[kind])
               for c, kind in (columns or {}).items()}
    table = pa.table({"path": pa.array(list(names), pa.string()), "feature": column,
                      "error": pa.array(list(errors), pa.string()), **carried})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def open_folder(backbone: Backbone, inputs: Sequence | Inputs, out: Path, part_size: int,
                counts: dict[str, int | None], restart: str = "or give another --out") -> PartFolder:
    """Check a features job's arguments before any image is read (`counts`: flag -> value, each at
    least 1) and open its folder; the single-machine and the Ray paths both start here."""
    pyarrow_modules()
    if backbone.image is None:
        raise ProtextError(f"backbone '{backbone.name}' has no image tower")
    check_counts({"--part-size": part_size, **counts})
    inputs = as_inputs(inputs)
    if not inputs.images:
        raise ProtextError("no images to compute features of")
    job = {"backbone": backbone.name, "revision": backbone.revision, "image_tower": backbone.image.fingerprint(),
           "precision": backbone.image.precision, "dim": backbone.text.feature_dim, "part_size": part_size,
           **inputs.identity()}
    if inputs.columns:
        job["columns"] = inputs.columns
    return PartFolder(out, ".parquet", job, restart=restart)


@dataclass(frozen=True)
class FeaturesEncoder:
    """A computed part -> the bytes of its Parquet feature part (with the inputs' carried `columns`)."""

    dim: int
    columns: dict[str, str]

    def __call__(self, part: Part, given: PartInputs) -> bytes:
        return part_bytes(given.names, part.features.numpy(), part.errors, self.dim, given.extras, self.columns)


def finish_folder(folder: PartFolder, images: int) -> dict:
    """Write the summary of a feature folder whose parts are all there; returns it."""
    return folder.finish(math.ceil(images / folder.settings["part_size"]), {"dim": folder.settings["dim"]})


def summarise(folder: PartFolder, images: int, processed: int, reused: int, seconds: float,
              notes: JobReport | None = None) -> JobReport:
    """Write the summary of a finished folder and report: the unreadable files counted, the first
    `engine.MAX_LISTED` named: from `notes` (the parts computed now) when they saw them all, else
    read back from the parts."""
    summary = finish_folder(folder, images)
    report = JobReport(folder.folder, images, processed, reused, seconds=seconds)
    if notes is not None and notes.unreadable == summary["unreadable"]:
        report.unreadable_files = notes.unreadable_files
    elif summary["unreadable"]:
        for paths, _, errors in FeatureParts(folder).parts(columns=("path", "error")):
            for p, e in zip(paths, errors):
                report.note(p, e)
            if len(report.unreadable_files) >= MAX_LISTED:
                break
    report.unreadable = summary["unreadable"]
    return report


def write_features(backbone: Backbone, paths: Sequence | Inputs, out: str | Path,
                   batch_size: int | None = None, workers: int | None = None, part_size: int = 1024,
                   ctx: Context = Context(), max_pixels: int = MAX_PIXELS) -> JobReport:
    """Image features of every input (paths, an `inputs.Manifest` or `inputs.Shards`) into the folder `out`, one Parquet
    part per `part_size` inputs; resumes a killed run (see the module's docstring). Unreadable files
    are rows with an error."""
    inputs = as_inputs(paths)
    folder = open_folder(backbone, inputs, Path(out), part_size, {"--batch-size": batch_size, "--workers": workers})
    notes = JobReport(folder.folder, inputs.images, 0, 0)
    processed, reused, seconds = run_job(backbone, inputs, [(folder, FeaturesEncoder(folder.settings["dim"],
                                                                                     inputs.columns))],
                                         part_size, batch_size=batch_size, workers=workers, ctx=ctx,
                                         desc="image features", max_pixels=max_pixels, notes=notes)
    return summarise(folder, inputs.images, processed, reused, seconds, notes)


class FeatureParts:
    """A finished feature folder, read one part at a time."""

    def __init__(self, folder: PartFolder):
        self.folder = folder
        self.info = folder.summary()
        self.images, self.dim = self.info["images"], self.info["dim"]

    def check(self, backbone: Backbone) -> None:
        """Refuse to use these features with another image tower than the one that made them (in
        whatever precision: reading features runs no image tower)."""
        weights = self.info["image_tower"].split("-")[0]  # the fingerprint without its precision
        if backbone.image is None or backbone.image.fingerprint().split("-")[0] != weights:
            raise ProtextError(f"the features were made by the image tower of '{self.info['backbone']}' "
                               f"({self.info['image_tower']}); '{backbone.name}' has other image weights: pass "
                               f"--backbone {self.info['backbone']} or compute the features again")

    def parts(self, columns: Sequence[str] = ("path", "feature", "error")
              ) -> Iterator[tuple[list[str], torch.Tensor | None, list[str | None]]]:
        """(paths, features (n, dim) with zero rows where unreadable, errors) per part, in order."""
        _, pq = pyarrow_modules()
        for i in range(self.info["parts"]):
            data = self.folder.read(i)
            try:
                table = pq.read_table(io.BytesIO(data), columns=list(columns))
            except Exception as e:  # pyarrow's ArrowInvalid and friends: a damaged file
                raise ProtextError(f"{self.folder.path(i)}: not a readable Parquet part ({e.__class__.__name__}); "
                                   f"rerun the protext features command that made it") from e
            feats = None
            if "feature" in columns:
                column = table.column("feature").combine_chunks()
                valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False))
                feats = np.zeros((len(table), self.dim), np.float32)
                feats[valid] = column.flatten().to_numpy().reshape(-1, self.dim)
                feats = torch.from_numpy(feats)
            yield table.column("path").to_pylist(), feats, table.column("error").to_pylist()


def open_features(folder: str | Path) -> FeatureParts:
    """A finished feature folder, to read part by part."""
    folder = Path(folder)
    if not (folder / "_settings.json").is_file():
        raise ProtextError(f"{folder}: not a feature folder (made by protext features)")
    return FeatureParts(PartFolder(folder, ".parquet"))


@dataclass
class StoredFeatures:
    """A finished feature folder in memory: `paths` in input order, `feats` (n, dim) with zero rows
    where `errors` gives the reason an image was unreadable, and the folder's summary `info`."""

    paths: list[str]
    feats: torch.Tensor
    errors: list[str | None]
    info: dict


def read_features(folder: str | Path) -> StoredFeatures:
    """A finished feature folder as tensors (for search, clustering, or your own code)."""
    stored = open_features(folder)
    feats = torch.zeros(stored.images, stored.dim)
    paths: list[str] = []
    errors: list[str | None] = []
    for p, f, e in stored.parts():  # one part in memory at a time, beside the result
        feats[len(paths): len(paths) + len(p)] = f
        paths += p
        errors += e
    return StoredFeatures(paths, feats, errors, stored.info)

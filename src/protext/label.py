"""`protext label`: label many image files with a classifier, into one JSONL, CSV or Parquet file.

Built for large jobs on one machine:

- images are decoded in a thread pool a bounded window ahead of the model, so decoding
  overlaps the forward pass (PIL and torch both release the GIL) and memory stays flat;
- rows are written in chunks, each chunk an atomic file in `<output>.parts/`, next to a
  `settings.json` that fingerprints what decides the rows (the class embeddings, the image
  tower, the logit scale, top-k, min-prob). A rerun after a kill reads the chunks back and
  labels only the images not yet written; a rerun with other settings is refused. When
  every image is done the output file is written atomically and the parts are removed;
- an unreadable file (corrupt, truncated, missing, not an image, a decompression bomb) is
  a row with its reason in `error`, listed in the report, never fatal.

Each row: `path`, `label` (the top label, or "unknown" when its probability is below
`min_prob`), `prob`, the top-k `top_labels` and `top_probs`, and `error`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence
from urllib.parse import urlsplit

import torch

from .cache import atomic_write_bytes, atomic_write_json, settings_change, to_json
from .classifier import ProTextClassifier
from .descriptions import normalize_name
from .errors import ProtextError
from .images import IMAGE_SUFFIXES, decode_ahead, is_uri, list_images, list_uri_images, read_uri

if TYPE_CHECKING:
    from .feature_folder import StoredFeatures

FORMATS = (".jsonl", ".csv", ".parquet")
UNKNOWN = "unknown"
DIGITS = 6  # probabilities are rounded so that the files read the same everywhere


@dataclass
class LabelReport:
    """What a run did: `labelled` now, `reused` from an interrupted earlier run, `unreadable` (path, reason)."""

    output: Path
    images: int
    labelled: int
    reused: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"output": str(self.output), "images": self.images, "labelled": self.labelled, "reused": self.reused,
                "unreadable": len(self.unreadable), "seconds": round(self.seconds, 2),
                "images_per_s": round(self.labelled / self.seconds, 2) if self.seconds > 0 else None}


def output_format(output: Path) -> str:
    """The output's format from its suffix; checked before any model is loaded."""
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise ProtextError(f"--output {output}: unknown format {suffix or '(no suffix)'!r}; end the file name with "
                           f"{', '.join(FORMATS)}")
    if Path(output).is_dir():
        raise ProtextError(f"--output {output} is a folder; give a file name ending with {', '.join(FORMATS)}")
    return suffix


def collect(inputs: Sequence[str | Path]) -> list[str | Path]:
    """Image paths from folders (recursive), files, CSV files listing paths, and URIs.

    A CSV's paths are its `path` column when a header row names one, else its first column;
    relative paths are relative to the CSV. URIs (s3://bucket/key.jpg, gs://..., file://...)
    work the same way, in the arguments or a CSV, through pyarrow's filesystems: an image URI
    stays a string, read later (`images.open_image`); a CSV URI is read and a folder URI
    (prefix) listed here. Paths appear once,
    in the order first given. A path that does not exist is kept: it is reported as
    unreadable, like any other bad file.
    """
    paths: list[str | Path] = []
    for item in inputs:
        if is_uri(str(item)):
            paths.extend(_uri_paths(str(item)))
            continue
        item = Path(item)
        if item.is_dir():
            found = list_images(item)
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


def _settings(clf: ProTextClassifier, top_k: int, min_prob: float | None, scores: str) -> dict:
    """What decides the rows; a resumed run must match it exactly."""
    weights = clf.weights.detach().float().cpu().contiguous()
    return {"classes": clf.classes, "head": clf.head, "backbone": clf.backbone.name,
            "image_tower": clf.backbone.image.fingerprint(), "logit_scale": clf.backbone.logit_scale,
            "class_embeddings_sha1": hashlib.sha1(weights.numpy().tobytes()).hexdigest(), "scores": scores,
            "top_k": top_k, "min_prob": min_prob}


def _row(path: str, probs: torch.Tensor | None, classes: Sequence[str], top_k: int, min_prob: float | None,
         error: str | None = None) -> dict:
    if probs is None:
        return {"path": path, "label": None, "prob": None, "top_labels": [], "top_probs": [], "error": error}
    values, idx = probs.topk(min(top_k, len(classes)))
    top_probs = [round(float(v), DIGITS) for v in values]
    top_labels = [classes[i] for i in idx.tolist()]
    label = UNKNOWN if min_prob is not None and top_probs[0] < min_prob else top_labels[0]
    return {"path": path, "label": label, "prob": top_probs[0], "top_labels": top_labels, "top_probs": top_probs,
            "error": None}


class Parts:
    """The finished chunks of a run, as atomic JSONL files in `<output>.parts/`."""

    def __init__(self, output: Path, settings: dict):
        self.folder = output.with_name(output.name + ".parts")
        self.rows: dict[str, dict] = {}
        saved = self.folder / "settings.json"
        change = settings_change(saved, settings, self.folder)
        if change is None:
            atomic_write_json(saved, settings)
        elif change[1]:
            raise ProtextError(f"{self.folder} holds an unfinished run with other settings ({', '.join(change[1])} "
                               f"differ); rerun with those, or delete {self.folder} to start over")
        self.next = 0
        for part in sorted(self.folder.glob("part-*.jsonl")) + sorted(self.folder.glob("shard-*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                self.rows[row["path"]] = row
            if part.stem.startswith("part-"):
                self.next = max(self.next, int(part.stem.split("-")[1]) + 1)

    def write(self, rows: list[dict]) -> None:
        self._save(f"part-{self.next:06d}.jsonl", rows)
        self.next += 1

    def write_shard(self, index: int, rows: list[dict]) -> None:
        """One shard of a distributed run (`distributed.py`), named by its place in the input."""
        self._save(f"shard-{index:06d}.jsonl", rows)

    def _save(self, name: str, rows: list[dict]) -> None:
        text = "".join(to_json(r, indent=None) + "\n" for r in rows)
        atomic_write_bytes(self.folder / name, text.encode())
        self.rows.update((r["path"], r) for r in rows)

    def has_shard(self, index: int) -> bool:
        return (self.folder / f"shard-{index:06d}.jsonl").is_file()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def start_job(clf: ProTextClassifier, paths: Sequence[str | Path], output: Path, top_k: int,
              min_prob: float | None, scores: str, counts: dict[str, int],
              resume: bool = True) -> tuple[str, list[str], Parts | None]:
    """Check a labelling job's arguments before any image is read (`counts`: flag -> value, each at
    least 1), and open its parts folder (with `resume`); returns the output format, the paths as
    strings and the parts. The single-machine, Ray and stored-features paths all start here."""
    fmt = output_format(output)
    clf.check_scores(scores)
    for name, value in {"--top-k": top_k, **counts}.items():
        if value < 1:
            raise ProtextError(f"{name} must be at least 1, got {value}")
    if min_prob is not None:
        if not 0 <= min_prob <= 1:
            raise ProtextError(f"--min-prob must be between 0 and 1, got {min_prob}")
        if UNKNOWN in {normalize_name(c) for c in clf.classes}:
            raise ProtextError(f"a class is named '{UNKNOWN}', the label --min-prob gives uncertain images; rename it")
    names = [str(p) for p in paths]
    if not names:
        raise ProtextError("no images to label")
    return fmt, names, Parts(output, _settings(clf, top_k, min_prob, scores)) if resume else None


def label(clf: ProTextClassifier, paths: Sequence[str | Path], output: Path, top_k: int = 3,
          min_prob: float | None = None, scores: str = "softmax", batch_size: int = 32, workers: int | None = None,
          chunk: int = 512, show_progress: bool = True) -> LabelReport:
    """Label every image of `paths` with `clf` into `output` (.jsonl, .csv or .parquet); resumes a killed run.

    `scores` is softmax (probabilities over the label set) or sigmoid (each label's own, SigLIP
    only), as in `ProTextClassifier.predict`.
    """
    from tqdm.auto import tqdm

    output = Path(output)
    fmt, names, parts = start_job(clf, paths, output, top_k, min_prob, scores,
                                  {"--batch-size": batch_size, "--chunk": chunk,
                                   "--workers": 1 if workers is None else workers})
    todo = [n for n in names if n not in parts.rows]
    reused = len(names) - len(todo)
    workers = workers or min(8, os.cpu_count() or 1)
    tower, device = clf.backbone.image, clf.backbone.device
    start = time.perf_counter()
    rows: list[dict] = []
    batch: list[tuple[int, torch.Tensor]] = []
    done_in_chunk = 0

    def flush_batch() -> None:
        pixels = torch.stack([p for _, p in batch]).to(device)
        probs = clf.probabilities(tower(pixels).cpu(), scores)
        rows.extend(_row(str(todo[i]), pr, clf.classes, top_k, min_prob) for (i, _), pr in zip(batch, probs))
        batch.clear()

    with tqdm(total=len(todo), desc="labelling", unit="img", disable=not show_progress or not todo) as bar:
        for i, result in decode_ahead(todo, tower.image_size, tower.mean, tower.std, workers,
                                      window=2 * batch_size + workers):
            if isinstance(result, str):
                rows.append(_row(str(todo[i]), None, clf.classes, top_k, min_prob, error=result))
            else:
                batch.append((i, result))
                if len(batch) == batch_size:
                    flush_batch()
            done_in_chunk += 1
            bar.update(1)
            if done_in_chunk == chunk or i == len(todo) - 1:
                if batch:
                    flush_batch()
                parts.write(rows)
                rows, done_in_chunk = [], 0
    seconds = time.perf_counter() - start
    final = [parts.rows[n] for n in names]
    write_rows(final, output, fmt, top_k)
    parts.remove()
    return LabelReport(output, len(names), len(todo), reused,
                       [(r["path"], r["error"]) for r in final if r["error"] is not None], seconds)


def label_features(clf: ProTextClassifier, stored: "StoredFeatures", output: Path, top_k: int = 3,
                   min_prob: float | None = None, scores: str = "softmax", show_progress: bool = True,
                   chunk: int = 4096) -> LabelReport:
    """Label image features stored by `protext features` (`feature_folder.read_features`) into
    `output`: the rows `label` gives for the same images, without reading an image. Scored
    `chunk` images at a time, so memory stays at chunk x classes however many there are; a
    run is minutes even for millions of images, so it is not resumed but redone."""
    from tqdm.auto import tqdm

    stored.check(clf.backbone)
    output = Path(output)
    fmt, names, _ = start_job(clf, stored.paths, output, top_k, min_prob, scores, {"--chunk": chunk}, resume=False)
    start = time.perf_counter()
    rows: list[dict] = []
    with tqdm(total=len(names), desc="labelling features", unit="img", disable=not show_progress) as bar:
        for begin in range(0, len(names), chunk):
            span = range(begin, min(len(names), begin + chunk))
            probs = clf.probabilities(stored.feats[begin : span.stop], scores)
            rows += [_row(names[i], None if stored.errors[i] else probs[i - begin], clf.classes, top_k, min_prob,
                          stored.errors[i]) for i in span]
            bar.update(len(span))
    write_rows(rows, output, fmt, top_k)
    return LabelReport(output, len(names), len(names), 0,
                       [(r["path"], r["error"]) for r in rows if r["error"] is not None], time.perf_counter() - start)


def write_rows(rows: list[dict], output: Path, fmt: str, top_k: int) -> None:
    """The whole output file, atomically, in its format."""
    if fmt == ".jsonl":
        data = "".join(to_json(r, indent=None) + "\n" for r in rows).encode()
    elif fmt == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        top_columns = [f"{what}_{j}" for j in range(1, top_k + 1) for what in ("label", "prob")]
        writer.writerow(["path", "label", "prob", *top_columns, "error"])
        for r in rows:
            top = [v for pair in zip(r["top_labels"], r["top_probs"]) for v in pair]
            top += [""] * (2 * top_k - len(top))
            prob = "" if r["prob"] is None else r["prob"]
            writer.writerow([r["path"], r["label"] or "", prob, *top, r["error"] or ""])
        data = buffer.getvalue().encode()
    else:
        data = _parquet(rows)
    atomic_write_bytes(output, data)


def _parquet(rows: list[dict]) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ProtextError("writing .parquet needs pyarrow: pip install -e '.[parquet]' (protext's 'parquet' extra), "
                           "or write .jsonl or .csv") from e
    schema = pa.schema([("path", pa.string()), ("label", pa.string()), ("prob", pa.float64()),
                        ("top_labels", pa.list_(pa.string())), ("top_probs", pa.list_(pa.float64())),
                        ("error", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


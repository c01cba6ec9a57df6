"""`protext label`: a label row for every image, into one JSONL, CSV or Parquet file.

The job runs through `engine.run_job` (or `distributed` on Ray): images decoded in threads
beside the model, probabilities computed per batch, each finished part of rows saved atomically
in `<output>.parts/` next to `_settings.json`, which holds what decides the rows (the class
embeddings, the image tower, the logit scale, top-k, min-prob, the input list). A rerun after
a kill labels only the parts not yet written; a rerun with other settings is refused. When every
part is done the output file is streamed from the parts (no more than one part in memory),
written atomically, and the parts are removed.

An unreadable file (corrupt, truncated, missing, not an image, a decompression bomb) is a row
with its reason in `error`, counted in the report, never fatal.

Each row: `path`, `label` (the top label, or "unknown" when its probability is below
`min_prob`), `prob`, the top-k `top_labels` and `top_probs`, and `error`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .cache import atomic_write
from .classifier import ProTextClassifier
from .context import Context
from .descriptions import normalize_name
from .engine import JobReport, Part, check_counts, run_job
from .feature_folder import FeaturesEncoder, finish_folder, open_folder
from .errors import ProtextError
from .images import MAX_PIXELS
from .inputs import Inputs, PartInputs, as_inputs, parts_of
from .parts import PartFolder, jsonl
from .transductive import Arrays, TransductiveSettings, refine

FORMATS = (".jsonl", ".csv", ".parquet")
UNKNOWN = "unknown"
DIGITS = 6  # probabilities are rounded so that the files read the same everywhere


def output_format(output: Path) -> str:
    """The output's format from its suffix; checked before any model is loaded."""
    suffix = Path(output).suffix.lower()
    if Path(output).is_dir():
        raise ProtextError(f"--output {output} is a folder; give a file name ending with {', '.join(FORMATS)}")
    if suffix not in FORMATS:
        raise ProtextError(f"--output {output}: unknown format {suffix or '(no suffix)'!r}; end the file name with "
                           f"{', '.join(FORMATS)}")
    return suffix


def settings(clf: ProTextClassifier, top_k: int, min_prob: float | None, activation: str) -> dict:
    """What decides the rows; a resumed run must match it exactly."""
    weights = clf.weights.detach().float().cpu().contiguous()
    return {"classes": clf.classes, "head": clf.head, "backbone": clf.backbone.name,
            "image_tower": clf.backbone.image.fingerprint(), "precision": clf.backbone.image.precision,
            "logit_scale": clf.backbone.logit_scale,
            "class_embeddings_sha1": hashlib.sha1(weights.numpy().tobytes()).hexdigest(), "activation": activation,
            "top_k": top_k, "min_prob": min_prob}


def row(path: str, probs: torch.Tensor | None, classes: Sequence[str], top_k: int, min_prob: float | None,
        error: str | None = None) -> dict:
    """One image's row: its top-k labels and probabilities, or the reason it is unreadable."""
    if probs is None:
        return {"path": path, "label": None, "prob": None, "top_labels": [], "top_probs": [], "error": error}
    values, idx = probs.topk(min(top_k, len(classes)))
    top_probs = [round(float(v), DIGITS) for v in values]
    top_labels = [classes[i] for i in idx.tolist()]
    label_ = UNKNOWN if min_prob is not None and top_probs[0] < min_prob else top_labels[0]
    return {"path": path, "label": label_, "prob": top_probs[0], "top_labels": top_labels, "top_probs": top_probs,
            "error": None}


ROW_COLUMNS = ("path", "label", "prob", "top_labels", "top_probs", "error", "transductive")
PART_FORMATS = (".parquet", ".jsonl")


def carried(columns: dict[str, str]) -> dict[str, str]:
    """Input column -> its name in the rows: its own, or `input_NAME` where a row column has that name
    (a manifest's ground-truth `label` becomes `input_label`)."""
    return {c: f"input_{c}" if c in ROW_COLUMNS else c for c in columns}


def part_rows(part: Part, given: PartInputs, classes: Sequence[str], top_k: int, min_prob: float | None,
              columns: dict[str, str] | None = None) -> list[dict]:
    """A part's rows, with the inputs' carried columns after the label columns."""
    names = carried(columns or {})
    out = []
    for j, (n, e) in enumerate(zip(given.names, part.errors)):
        r = row(n, None if e else part.scores[j], classes, top_k, min_prob, e)
        for c, name in names.items():
            r[name] = given.extras[c][j]
        out.append(r)
    return out


def rows_bytes(rows: list[dict], fmt: str, columns: dict[str, str] | None = None) -> bytes:
    """One part of rows as a file: JSON lines, or a Parquet table (`--out DIR` parts)."""
    if fmt == ".jsonl":
        return jsonl(rows)
    pa, pq = _pyarrow()
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema(pa, columns=columns)), sink)
    return sink.getvalue()


@dataclass(frozen=True)
class RowsEncoder:
    """A computed part (its scores) -> the bytes of its label part: rows in `part_format`."""

    classes: list[str]
    top_k: int
    min_prob: float | None
    columns: dict[str, str]
    part_format: str

    def __call__(self, part: Part, given: PartInputs) -> bytes:
        rows = part_rows(part, given, self.classes, self.top_k, self.min_prob, self.columns)
        return rows_bytes(rows, self.part_format, out_columns(self.columns))


def check_job(clf: ProTextClassifier, top_k: int, min_prob: float | None, activation: str,
              counts: dict[str, int | None]) -> None:
    """A labelling job's arguments, checked before any image is read (`counts`: flag -> value, each
    at least 1). The single-machine, Ray and stored-features paths all start here."""
    clf.check_activation(activation)
    check_counts({"--top-k": top_k, **counts})
    if min_prob is not None:
        if not 0 <= min_prob <= 1:
            raise ProtextError(f"--min-prob must be between 0 and 1, got {min_prob}")
        if UNKNOWN in {normalize_name(c) for c in clf.classes}:
            raise ProtextError(f"a class is named '{UNKNOWN}', the label --min-prob gives uncertain images; rename it")


@dataclass
class LabelJob:
    """A labelling job, checked and opened before any image is read; both engines run one.

    Its rows go to `output` (one file, streamed from `<output>.parts/` at the end) or stay in `out`
    (a folder of Parquet or JSONL parts that reads as one table); with `features`, the image
    features of the same forward pass go to that feature folder too."""

    clf: ProTextClassifier
    inputs: Inputs
    top_k: int
    min_prob: float | None
    activation: str
    part_size: int
    folder: PartFolder
    fmt: str  # the output file's suffix, or the parts' (out)
    output: Path | None = None
    out: Path | None = None
    features: PartFolder | None = None

    @property
    def parts(self) -> int:
        return parts_of(self.inputs, self.part_size)

    @property
    def columns(self) -> dict[str, str]:
        return self.inputs.columns

    def outputs(self) -> list[tuple[PartFolder, Callable[[Part, PartInputs], bytes]]]:
        """(folder, encoder) of every folder the job writes a part into; the encoders are plain records,
        so Ray workers get the same ones."""
        found = [(self.folder, RowsEncoder(self.clf.classes, self.top_k, self.min_prob, self.columns,
                                           ".jsonl" if self.output is not None else self.fmt))]
        if self.features is not None:
            found.append((self.features, FeaturesEncoder(self.features.settings["dim"], self.columns)))
        return found

    def finish(self, processed: int, reused: int, seconds: float, notes: JobReport | None = None) -> JobReport:
        """The output file streamed from the parts (then removed), or the folder's summary; the report."""
        images = self.inputs.images
        if self.features is not None:
            finish_folder(self.features, images)  # its unreadable inputs are the labels' own
        if self.output is not None:
            return finish(self.folder, self.parts, self.output, self.fmt, self.top_k, images, processed, reused,
                          seconds, out_columns(self.columns))
        summary = self.folder.finish(self.parts, {"columns": out_columns(self.columns)})
        report = notes or JobReport(self.out, images, processed, reused)
        report.output, report.images, report.processed, report.reused, report.seconds = \
            self.out, images, processed, reused, seconds
        report.unreadable = summary["unreadable"]
        return report


def out_columns(columns: dict[str, str]) -> dict[str, str]:
    """The carried columns by their names in the rows, with their types."""
    return {carried(columns)[c]: kind for c, kind in columns.items()}


def open_job(clf: ProTextClassifier, paths: Sequence | Inputs, output: Path | None, top_k: int,
             min_prob: float | None, activation: str, part_size: int, counts: dict[str, int | None], *,
             out: Path | None = None, part_format: str = ".parquet", save_features: Path | None = None) -> LabelJob:
    """Check a labelling job before any image is read and open its folders; the single-machine and
    Ray engines both start here."""
    if (output is None) == (out is None):
        raise ProtextError("give the labels one destination: --output FILE (one file) or --out DIR (a folder of parts)")
    if out is not None and part_format not in PART_FORMATS:
        raise ProtextError(f"--part-format {part_format.lstrip('.')}: choose parquet or jsonl")
    fmt = output_format(Path(output)) if output is not None else part_format
    if fmt == ".parquet":
        _pyarrow()
    check_job(clf, top_k, min_prob, activation, {"--part-size": part_size, **counts})
    inputs = as_inputs(paths)
    if not inputs.images:
        raise ProtextError("no images to label")
    if clf.views and save_features is not None:
        raise ProtextError(f"head '{clf.head}' runs the tower on augmented views; --save-features keeps one feature "
                           f"per image: choose another head, or run protext features")
    job = {**settings(clf, top_k, min_prob, activation), "part_size": part_size, **inputs.identity()}
    if inputs.columns:
        job["columns"] = inputs.columns
    if output is not None:
        output = Path(output)
        folder = PartFolder(output.with_name(output.name + ".parts"), ".jsonl", job,
                            restart=f"or delete {output.name}.parts to start over")
    else:
        out = Path(out)
        folder = PartFolder(out, fmt, {**job, "part_format": fmt.lstrip(".")}, restart="or give another --out")
    features = None
    if save_features is not None:
        features = open_folder(clf.backbone, inputs, Path(save_features), part_size, {},
                               restart="or give another --save-features")
    return LabelJob(clf, inputs, top_k, min_prob, activation, part_size, folder, fmt, output, out, features)


def open_parts(clf: ProTextClassifier, names: Sequence[str], output: Path, top_k: int, min_prob: float | None,
               activation: str, part_size: int) -> PartFolder:
    """The folder of finished parts beside `output` (`<output>.parts/`), checked against this job."""
    return open_job(clf, names, output, top_k, min_prob, activation, part_size, {}).folder


def label(clf: ProTextClassifier, paths: Sequence | Inputs, output: Path | None = None, top_k: int = 3,
          min_prob: float | None = None, activation: str = "softmax", batch_size: int | None = None,
          workers: int | None = None, part_size: int = 512, ctx: Context = Context(),
          max_pixels: int = MAX_PIXELS, *, out: Path | None = None, part_format: str = ".parquet",
          save_features: Path | None = None) -> JobReport:
    """Label every image of `paths` (a list, an `inputs.Manifest` or `inputs.Shards`) with `clf` into `output` (.jsonl,
    .csv or .parquet) or, with `out`, into a folder of parts (`part_format` .parquet or .jsonl);
    `save_features` also keeps the image features, from the same forward pass, in that feature
    folder. Resumes a killed run.

    `activation` is softmax (probabilities over the label set) or sigmoid (each label's own, SigLIP
    only), as in `ProTextClassifier.predict`.
    """
    job = open_job(clf, paths, output, top_k, min_prob, activation, part_size,
                   {"--batch-size": batch_size, "--workers": workers}, out=out, part_format=part_format,
                   save_features=save_features)
    notes = JobReport(job.out or job.output, job.inputs.images, 0, 0)
    processed, reused, seconds = run_job(clf.backbone, job.inputs, job.outputs(), part_size,
                                         batch_size=batch_size, workers=workers,
                                         head=lambda f: clf.probabilities(f, activation), ctx=ctx, desc="labelling",
                                         max_pixels=max_pixels,
                                         augment=(clf.views, clf.inputs.awt.seed) if clf.views else None, notes=notes)
    return job.finish(processed, reused, seconds, notes)


def finish(folder: PartFolder, parts: int, output: Path, fmt: str, top_k: int, images: int, processed: int,
           reused: int, seconds: float, columns: dict[str, str] | None = None) -> JobReport:
    """Stream the finished parts into `output`, remove them, and report."""
    if folder.missing(range(parts)):
        raise ProtextError(f"{folder.folder}: parts {folder.missing(range(parts))[:5]} are missing; rerun the same "
                           f"command")
    report = JobReport(output, images, processed, reused, seconds=seconds)

    def rows() -> Iterator[list[dict]]:
        for i in range(parts):
            part = [json.loads(line) for line in folder.read(i).decode().splitlines()]
            for r in part:
                report.note(r["path"], r["error"])
            yield part

    write_rows(rows(), output, fmt, top_k, columns=columns)
    folder.remove()
    return report


def label_features(clf: ProTextClassifier, features: str | Path, output: Path, top_k: int = 3,
                   min_prob: float | None = None, activation: str = "softmax", ctx: Context = Context()) -> JobReport:
    """Label the image features a `protext features` folder holds into `output`: the rows `label`
    gives for the same images, without reading an image. One part of the folder in memory at a
    time, so memory stays at part size x classes however many images there are; a run takes
    minutes even for millions of images, so it is not resumed but redone."""
    from .feature_folder import open_features

    output = Path(output)
    fmt = output_format(output)
    check_job(clf, top_k, min_prob, activation, {})
    if clf.views:
        raise ProtextError(f"head '{clf.head}' scores augmented views of each image; a feature folder holds one "
                           f"feature per image: label the images themselves")
    stored = open_features(features)
    stored.check(clf.backbone)
    report = JobReport(output, stored.images, stored.images, 0)
    started = time.perf_counter()

    def rows() -> Iterator[list[dict]]:
        with ctx.bar(stored.images, "labelling features", "img") as bar:
            for paths, feats, errors in stored.parts():
                probs = clf.probabilities(feats, activation)
                yield [row(p, None if e else probs[i], clf.classes, top_k, min_prob, e)
                       for i, (p, e) in enumerate(zip(paths, errors))]
                for p, e in zip(paths, errors):
                    report.note(p, e)
                bar.update(len(paths))

    write_rows(rows(), output, fmt, top_k)
    report.seconds = time.perf_counter() - started
    return report


def label_transductive(clf: ProTextClassifier, features: str | Path, output: Path, top_k: int = 3,
                       min_prob: float | None = None, settings: TransductiveSettings = TransductiveSettings(),
                       ctx: Context = Context(), store: str | Path | None = None) -> JobReport:
    """Label a `protext features` folder transductively: the head's predictions for the whole
    collection refined together with TransCLIP's procedure (`transductive.refine`); each row's
    probabilities are its refined soft label, and the rows say `transductive: true`.

    The features and the (images, classes) state go to memory-mapped files in `store` (by default
    `<output>.transductive/` once they pass 1 GiB, removed at the end), so memory stays at a few
    blocks of rows however large the collection; the cost is the exact neighbour search, N² · d.
    """
    import shutil

    from .feature_folder import open_features

    output = Path(output)
    fmt = output_format(output)
    check_job(clf, top_k, min_prob, "softmax", {})
    if clf.views:
        raise ProtextError(f"head '{clf.head}' scores augmented views of each image; transductive labelling reads "
                           f"one feature per image: choose another head")
    stored = open_features(features)
    stored.check(clf.backbone)
    readable = sum(e is None for _, _, errors in stored.parts(("path", "error")) for e in errors)
    classes = len(clf.classes)
    if store is None and readable * (stored.dim + 5 * classes) * 4 > 2**30:
        store = output.with_name(output.name + ".transductive")
    arrays = Arrays(store)
    report = JobReport(output, stored.images, stored.images, 0)
    started = time.perf_counter()
    try:
        feats = arrays.new("features", readable, stored.dim)
        probs = arrays.new("predictions", readable, classes)
        at = 0
        with ctx.bar(stored.images, "first pass", "img") as bar:
            for paths, part, errors in stored.parts():
                good = torch.tensor([e is None for e in errors], dtype=torch.bool)
                x = torch.nn.functional.normalize(part[good], dim=-1)
                feats[at: at + len(x)] = x
                probs[at: at + len(x)] = clf.probabilities(x, "softmax")
                at += len(x)
                bar.update(len(paths))
        z = refine(feats, probs, settings, store, ctx)

        def rows() -> Iterator[list[dict]]:
            at = 0
            for paths, _, errors in stored.parts(("path", "error")):
                out = []
                for p, e in zip(paths, errors):
                    r = row(p, None if e else z[at], clf.classes, top_k, min_prob, e)
                    at += e is None
                    report.note(p, e)
                    out.append({**r, "transductive": True})
                yield out

        write_rows(rows(), output, fmt, top_k, transductive=True)
    finally:
        arrays.remove()
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    return report


def write_rows(parts: Iterable[list[dict]], output: Path, fmt: str, top_k: int, transductive: bool = False,
               columns: dict[str, str] | None = None) -> None:
    """The whole output file, atomically, in its format, from rows that come a part at a time.
    Transductive rows carry a `transductive` column (true); `columns` are the carried ones (name ->
    type), after the others."""
    columns = columns or {}

    def write(tmp: str) -> None:
        if fmt == ".parquet":
            pa, pq = _pyarrow()
            schema = _schema(pa, transductive, columns)
            with pq.ParquetWriter(tmp, schema) as writer:
                for rows in parts:
                    if rows:
                        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            return
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if fmt == ".jsonl":
                for rows in parts:
                    f.write(jsonl(rows).decode())
                return
            writer = csv.writer(f, lineterminator="\n")
            top_columns = [f"{what}_{j}" for j in range(1, top_k + 1) for what in ("label", "prob")]
            writer.writerow(["path", "label", "prob", *top_columns, "error", *(["transductive"] * transductive),
                             *columns])
            for rows in parts:
                for r in rows:
                    top = [v for pair in zip(r["top_labels"], r["top_probs"]) for v in pair]
                    top += [""] * (2 * top_k - len(top))
                    writer.writerow([r["path"], r["label"] or "", "" if r["prob"] is None else r["prob"], *top,
                                     r["error"] or "", *(["true"] * transductive),
                                     *("" if r.get(c) is None else str(r[c]).lower() if isinstance(r[c], bool)
                                       else r[c] for c in columns)])

    if fmt == ".parquet":
        _pyarrow()  # before the rows are made: says how to install it
    atomic_write(output, write)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ProtextError("writing .parquet needs pyarrow: pip install -e '.[parquet]' (protext's 'parquet' extra), "
                           "or write .jsonl or .csv") from e
    return pa, pq


def _schema(pa, transductive: bool = False, columns: dict[str, str] | None = None):
    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
    return pa.schema([("path", pa.string()), ("label", pa.string()), ("prob", pa.float64()),
                      ("top_labels", pa.list_(pa.string())), ("top_probs", pa.list_(pa.float64())),
                      ("error", pa.string()), *([("transductive", pa.bool_())] * transductive),
                      *((name, types[kind]) for name, kind in (columns or {}).items())])

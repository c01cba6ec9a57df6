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
import json
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .cache import atomic_write, sha1
from .classifier import ProTextClassifier
from .context import Context
from .descriptions import normalize_name
from .engine import JobReport, Part, check_counts, run_job, spans
from .errors import ProtextError
from .hub_datasets import HubImage
from .images import MAX_PIXELS
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


def part_rows(part: Part, names: Sequence[str], classes: Sequence[str], top_k: int,
              min_prob: float | None) -> list[dict]:
    return [row(n, None if e else part.scores[j], classes, top_k, min_prob, e)
            for j, (n, e) in enumerate(zip(names, part.errors))]


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


def start(clf: ProTextClassifier, paths: Sequence[str | Path], output: Path, top_k: int, min_prob: float | None,
          activation: str, part_size: int, counts: dict[str, int | None]) -> tuple[str, list[str], PartFolder]:
    """Check a labelling job before any image is read and open its parts; returns the output format,
    the inputs as strings and the folder. The single-machine and Ray engines both start here."""
    fmt = output_format(output)
    check_job(clf, top_k, min_prob, activation, {"--part-size": part_size, **counts})
    names = [str(p) for p in paths]
    if not names:
        raise ProtextError("no images to label")
    return fmt, names, open_parts(clf, names, output, top_k, min_prob, activation, part_size)


def open_parts(clf: ProTextClassifier, names: Sequence[str], output: Path, top_k: int, min_prob: float | None,
               activation: str, part_size: int) -> PartFolder:
    """The folder of finished parts beside `output` (`<output>.parts/`), checked against this job."""
    job = {**settings(clf, top_k, min_prob, activation), "part_size": part_size, "images": len(names),
           "paths_sha1": sha1("\n".join(names))}
    folder = output.with_name(output.name + ".parts")
    return PartFolder(folder, ".jsonl", job, restart=f"or delete {folder} to start over")


def label(clf: ProTextClassifier, paths: Sequence[str | Path | HubImage], output: Path, top_k: int = 3,
          min_prob: float | None = None, activation: str = "softmax", batch_size: int | None = None,
          workers: int | None = None, part_size: int = 512, ctx: Context = Context(),
          max_pixels: int = MAX_PIXELS) -> JobReport:
    """Label every image of `paths` with `clf` into `output` (.jsonl, .csv or .parquet); resumes a killed run.

    `activation` is softmax (probabilities over the label set) or sigmoid (each label's own, SigLIP
    only), as in `ProTextClassifier.predict`.
    """
    output = Path(output)
    fmt, names, folder = start(clf, paths, output, top_k, min_prob, activation, part_size,
                               {"--batch-size": batch_size, "--workers": workers})

    def encode(part: Part, names_here: list[str]) -> bytes:
        return jsonl(part_rows(part, names_here, clf.classes, top_k, min_prob))

    processed, reused, seconds = run_job(clf.backbone, names, folder, part_size, encode, items=list(paths),
                                         batch_size=batch_size,
                                         workers=workers, head=lambda f: clf.probabilities(f, activation), ctx=ctx,
                                         desc="labelling", max_pixels=max_pixels,
                                         augment=(clf.views, clf.inputs.awt.seed) if clf.views else None)
    return finish(folder, len(spans(len(names), part_size)), output, fmt, top_k, len(names), processed, reused,
                  seconds)


def finish(folder: PartFolder, parts: int, output: Path, fmt: str, top_k: int, images: int, processed: int,
           reused: int, seconds: float) -> JobReport:
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

    write_rows(rows(), output, fmt, top_k)
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


def write_rows(parts: Iterable[list[dict]], output: Path, fmt: str, top_k: int, transductive: bool = False) -> None:
    """The whole output file, atomically, in its format, from rows that come a part at a time.
    Transductive rows carry a `transductive` column (true)."""
    def write(tmp: str) -> None:
        if fmt == ".parquet":
            pa, pq = _pyarrow()
            schema = _schema(pa, transductive)
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
            writer.writerow(["path", "label", "prob", *top_columns, "error", *(["transductive"] * transductive)])
            for rows in parts:
                for r in rows:
                    top = [v for pair in zip(r["top_labels"], r["top_probs"]) for v in pair]
                    top += [""] * (2 * top_k - len(top))
                    writer.writerow([r["path"], r["label"] or "", "" if r["prob"] is None else r["prob"], *top,
                                     r["error"] or "", *(["true"] * transductive)])

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


def _schema(pa, transductive: bool = False):
    return pa.schema([("path", pa.string()), ("label", pa.string()), ("prob", pa.float64()),
                      ("top_labels", pa.list_(pa.string())), ("top_probs", pa.list_(pa.float64())),
                      ("error", pa.string()), *([("transductive", pa.bool_())] * transductive)])

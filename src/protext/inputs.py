"""The inputs of an image job, handed out one part at a time: a list, or manifests read in place.

A job of `label` or `features` is cut into parts of `part_size` consecutive inputs (part N holds
inputs N*part_size .. (N+1)*part_size-1, whatever the source), and only the parts being computed
are ever in memory:

- `ListInputs`: what `collect` lists (image files, folders, CSV lists mixed with them,
  URIs) or a dataset's rows. The list is in memory; fine up to millions of inputs.
- `Manifest`: one or more manifest files (Parquet, CSV or JSONL; local, `s3://`, `gs://`, or a
  folder of them) with a `path` column (for a CSV without a header, its first column) and any
  other columns, which are carried through to the output. Opening one reads only what locates
  the parts: a Parquet file's footer, and for CSV and JSONL one pass over the bytes that keeps
  the offset of every part's first row (8 bytes a part), so a billion-row manifest costs the
  driver a few MB. A part's rows are read from the file when the part is computed, by
  whichever process computes it (a Ray worker reads its own parts).

Relative paths in a manifest are relative to the manifest file. A manifest is identified in a
job's settings by its files' names, sizes and a digest of their bytes (CSV, JSONL) or footers
(Parquet), so a rerun resumes only against the same manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from .cache import sha1
from .errors import ProtextError
from .images import IMAGE_SUFFIXES, is_uri, list_images, list_uri_images, read_uri, uri_location

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl")
TYPES = ("string", "int64", "float64", "bool")  # the types carried columns are kept in


@dataclass
class PartInputs:
    """One part's inputs: the `names` rows give them, the `items` the engine decodes (paths, URIs,
    dataset rows), and the carried `extras`, column -> one value per input."""

    names: list[str]
    items: list
    extras: dict[str, list] = field(default_factory=dict)


class ListInputs:
    """Inputs listed in memory (see the module's docstring)."""

    columns: dict[str, str] = {}

    def __init__(self, items: Sequence):
        self.items = list(items)
        self.names = [str(i) for i in self.items]
        self.images = len(self.items)

    def identity(self) -> dict:
        """What names these inputs in a job's settings."""
        return {"images": self.images, "paths_sha1": sha1("\n".join(self.names))}

    def part(self, index: int, part_size: int) -> PartInputs:
        span = slice(index * part_size, (index + 1) * part_size)
        return PartInputs(self.names[span], self.items[span])

    def sources(self, index: int, part_size: int) -> PartInputs:
        """The part as a worker elsewhere reads it: local paths made absolute (a relative path would
        be resolved in the worker's own folder)."""
        part = self.part(index, part_size)
        part.items = [p if is_uri(str(p)) or not isinstance(p, (str, Path)) else str(Path(p).resolve())
                      for p in part.items]
        return part


@dataclass
class ManifestFile:
    """One manifest file: where it is, its kind, its rows, and where its parts start."""

    location: str  # a local path (as given: rows name paths relative to it) or a URI
    kind: str  # "parquet", "csv" or "jsonl"
    size: int
    digest: str
    rows: int = 0
    first_row: int = 0  # the job's position of its first row
    path_column: int | str = "path"  # a CSV without a header: 0
    header: list[str] | None = None  # a CSV's header
    data_start: int = 0  # byte offset of its first data row (CSV after the header)
    row_groups: list[int] = field(default_factory=list)  # Parquet: rows per row group

    @property
    def source(self) -> str:
        """Where any process reads it from: the URI, or the local path made absolute."""
        return self.location if is_uri(self.location) else str(Path(self.location).resolve())


class Manifest:
    """Manifest files read a part at a time (see the module's docstring)."""

    def __init__(self, locations: Sequence[str], part_size: int):
        self.part_size = part_size
        self.files: list[ManifestFile] = []
        self.starts = array("q")  # per part: (file index << 40) | byte offset, CSV and JSONL
        self.columns: dict[str, str] = {}
        for location in locations:
            self._add(location)
        self.images = sum(f.rows for f in self.files)
        if self.images == 0:
            raise ProtextError(f"{', '.join(locations)}: the manifest has no rows")

    # -- opening -----------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"images": self.images, "manifest_sha1": sha1(*(f"{f.location}:{f.size}:{f.digest}" for f in self.files))}

    def _add(self, location: str) -> None:
        kind = Path(urlsplit(location).path if is_uri(location) else location).suffix.lower().lstrip(".")
        size = _size(location)
        entry = ManifestFile(location, kind, size, "", first_row=sum(f.rows for f in self.files))
        if kind == "parquet":
            self._add_parquet(entry)
        else:
            self._add_lines(entry)
        self.files.append(entry)

    def _add_parquet(self, entry: ManifestFile) -> None:
        import pyarrow as pa

        pq = _parquet()
        try:
            with _open(entry.location) as f:
                meta = pq.ParquetFile(f).metadata
                f.seek(max(0, entry.size - 65536))
                entry.digest = hashlib.sha1(f.read()).hexdigest()  # the footer: schema, row groups, statistics
                schema = meta.schema.to_arrow_schema()
        except ProtextError:
            raise
        except Exception as e:  # pyarrow's ArrowInvalid and friends
            raise ProtextError(f"{entry.location}: not a readable Parquet file ({e.__class__.__name__}: {e})") from e
        if "path" not in schema.names:
            raise ProtextError(f"{entry.location}: a manifest needs a 'path' column; it has {', '.join(schema.names)}")
        entry.rows = meta.num_rows
        entry.row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        kinds = {}
        for f in schema:
            if f.name != "path":
                kinds[f.name] = ("int64" if pa.types.is_integer(f.type) else "float64" if pa.types.is_floating(f.type)
                                 else "bool" if pa.types.is_boolean(f.type) else "string")
        self._columns(entry, kinds)

    def _add_lines(self, entry: ManifestFile) -> None:
        """One pass over a CSV or JSONL file: its digest, its rows, the offset of each part's first row."""
        digest = hashlib.sha1()
        index = len(self.files)
        at, rows, first = 0, 0, None
        part_size, job_row = self.part_size, entry.first_row
        with _open(entry.location) as f:
            for line in f:
                digest.update(line)
                if not line.strip():
                    at += len(line)
                    continue
                if first is None:  # the header (CSV) or the first row (JSONL) says the columns
                    first = line
                    if entry.kind == "csv" and self._csv_header(entry, line):
                        at += len(line)
                        entry.data_start = at
                        continue
                    if entry.kind == "jsonl":
                        self._jsonl_columns(entry, line)
                if (job_row + rows) % part_size == 0:
                    self.starts.append((index << 40) | at)
                rows += 1
                at += len(line)
        entry.rows, entry.digest = rows, digest.hexdigest()
        if first is None:
            self._columns(entry, {})

    def _csv_header(self, entry: ManifestFile, line: bytes) -> bool:
        """Whether the first line is a header (it names a `path` column); sets the columns."""
        cells = next(csv.reader([_text(line, entry.location, 1)]))
        names = [c.strip() for c in cells]
        if "path" not in [n.lower() for n in names]:
            entry.path_column, entry.header = 0, None
            self._columns(entry, {})
            return False
        entry.header = names
        entry.path_column = [n.lower() for n in names].index("path")
        self._columns(entry, {n: "string" for i, n in enumerate(names) if i != entry.path_column and n})
        return True

    def _jsonl_columns(self, entry: ManifestFile, line: bytes) -> None:
        """JSONL columns: the first row's keys, carried as text (strings as they are, other values as JSON)."""
        row = _json_row(line, entry.location, 1)
        self._columns(entry, {k: "string" for k in row if k != "path"})

    def _columns(self, entry: ManifestFile, kinds: dict[str, str]) -> None:
        """The carried columns: the first file's; every other file must have the same names."""
        if not self.files:
            self.columns = kinds
        elif list(kinds) != list(self.columns):
            raise ProtextError(f"{entry.location}: columns {', '.join(kinds) or '(path only)'}, but "
                               f"{self.files[0].location} has {', '.join(self.columns) or '(path only)'}; every "
                               f"manifest file of one job needs the same columns")

    # -- reading -------------------------------------------------------------------------------
    def part(self, index: int, part_size: int | None = None) -> PartInputs:
        """Part `index`'s rows, read from the files (never more than one part in memory)."""
        if part_size not in (None, self.part_size):
            raise ProtextError(f"this manifest was opened for parts of {self.part_size} rows, not {part_size}")
        first, last = index * self.part_size, min(self.images, (index + 1) * self.part_size)
        out = PartInputs([], [], {c: [] for c in self.columns})
        for entry in self.files:
            lo, hi = max(first, entry.first_row), min(last, entry.first_row + entry.rows)
            if lo < hi:
                self._read(entry, lo - entry.first_row, hi - lo, out, index)
        return out

    sources = part

    def _read(self, entry: ManifestFile, start: int, count: int, out: PartInputs, index: int) -> None:
        if entry.kind == "parquet":
            rows = self._parquet_rows(entry, start, count)
        else:
            rows = self._line_rows(entry, start, count, index)
        named, source = _base(entry.location), _base(entry.source)
        for number, row in rows:
            path = row.get("path")
            if not isinstance(path, str) or not path.strip():
                raise ProtextError(f"{entry.location}: row {number - entry.first_row} has no path")
            path = path.strip()
            given = is_uri(path) or Path(path).is_absolute()
            out.names.append(path if given else _join(named, path))
            out.items.append(path if given else _join(source, path))
            for c in self.columns:
                out.extras[c].append(_value(row.get(c), self.columns[c]))

    def _parquet_rows(self, entry: ManifestFile, start: int, count: int):
        pq = _parquet()
        groups, at, skip = [], 0, 0
        for g, n in enumerate(entry.row_groups):
            if at + n > start and at < start + count:
                if not groups:
                    skip = start - at
                groups.append(g)
            at += n
        with _open(entry.source) as f:
            table = pq.ParquetFile(f).read_row_groups(groups, columns=["path", *self.columns])
        table = table.slice(skip, count)
        for i, row in enumerate(table.to_pylist()):
            yield entry.first_row + start + i + 1, row

    def _line_rows(self, entry: ManifestFile, start: int, count: int, index: int):
        """Rows from the part's recorded offset (a part that starts in an earlier file reads this one
        from its first row)."""
        me = self.files.index(entry)
        offset = entry.data_start
        if start > 0 or (index < len(self.starts) and self.starts[index] >> 40 == me):
            offset = self.starts[index] & ((1 << 40) - 1)
        number = entry.first_row + start
        with _open(entry.source) as f:
            f.seek(offset)
            read = 0
            for line in f:
                if read == count:
                    break
                if not line.strip():
                    continue
                number += 1
                read += 1
                if entry.kind == "jsonl":
                    yield number, _json_row(line, entry.location, number - entry.first_row)
                else:
                    cells = next(csv.reader([_text(line, entry.location, number - entry.first_row)]))
                    if entry.header is None:
                        yield number, {"path": cells[0] if cells else ""}
                    else:
                        yield number, {("path" if i == entry.path_column else n): (cells[i] if i < len(cells) else None)
                                       for i, n in enumerate(entry.header)}


@dataclass
class TarSample:
    """One WebDataset sample's image, decoded when the engine reads it; `str()` is its key."""

    key: str
    data: bytes

    def __str__(self) -> str:
        return self.key

    def open(self):
        from .images import MAX_PIXELS, open_header

        with open_header(io.BytesIO(self.data), MAX_PIXELS) as im:
            im.load()
            return im.copy()


def sample_key(name: str) -> tuple[str, str]:
    """A tar member's (key, extension) as WebDataset splits them: the key is the name up to the first
    dot of its last component ("a/b/000123.jpg" -> "a/b/000123", "jpg"; "x.seg.png" -> "x", "seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class Shards:
    """WebDataset shards (uncompressed .tar files, or a folder of them): one sample per key, its image
    (the first member with an image extension) decoded by the engine, its other members (.cls,
    .txt, .json, ...) carried as text columns named by their extension; a sample's key is its path
    in the output. Opening reads the tar headers only (seeking past the data), keeping the offset
    of each part's first sample; a part's samples are read when it is computed."""

    def __init__(self, locations: Sequence[str], part_size: int):
        import tarfile

        self.part_size, self.files, self.rows = part_size, [str(x) for x in locations], []
        self.starts: list[tuple[int, int]] = []  # per part: (file, header offset of its first sample)
        self.columns: dict[str, str] = {}
        digest = hashlib.sha1()
        count = 0
        for index, location in enumerate(self.files):
            if not location.lower().endswith(".tar"):
                raise ProtextError(f"{location}: WebDataset shards are read as uncompressed .tar files")
            rows, last = 0, None
            try:
                with _open(location) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = sample_key(member.name)
                        digest.update(f"{member.name}:{member.size}".encode())
                        if key != last:
                            if count % part_size == 0:
                                self.starts.append((index, member.offset))
                            count, rows, last = count + 1, rows + 1, key
                        if index == 0 and rows == 1 and ext not in _IMAGE_EXTENSIONS:
                            self.columns[ext] = "string"
            except tarfile.TarError as e:
                raise ProtextError(f"{location}: not a readable tar file ({e})") from e
            self.rows.append(rows)
        self.images = count
        self.digest = digest.hexdigest()
        if not count:
            raise ProtextError(f"{', '.join(self.files)}: the shards hold no samples")

    def identity(self) -> dict:
        return {"images": self.images, "shards_sha1": sha1(*self.files, self.digest)}

    def part(self, index: int, part_size: int | None = None) -> PartInputs:
        import tarfile

        if part_size not in (None, self.part_size):
            raise ProtextError(f"these shards were opened for parts of {self.part_size} samples, not {part_size}")
        want = min(self.part_size, self.images - index * self.part_size)
        out = PartInputs([], [], {c: [] for c in self.columns})
        file, offset = self.starts[index]
        sample: dict | None = None

        def close(sample: dict) -> None:
            out.names.append(sample["key"])
            out.items.append(TarSample(sample["key"], sample.get("image", b"")))
            for c in self.columns:
                out.extras[c].append(sample.get(c))

        while len(out.names) < want and file < len(self.files):
            with _open(self.files[file]) as f:
                f.seek(offset)
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = sample_key(member.name)
                        if sample is not None and key != sample["key"]:
                            close(sample)
                            sample = None
                            if len(out.names) == want:
                                break
                        sample = sample or {"key": key}
                        data = tar.extractfile(member).read()
                        if ext in _IMAGE_EXTENSIONS:
                            sample.setdefault("image", data)
                        elif ext in self.columns:
                            sample[ext] = data.decode("utf-8", "replace").strip()
            if sample is not None and len(out.names) < want:
                close(sample)
                sample = None
            file, offset = file + 1, 0
        return out

    sources = part


_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")


# -- listing inputs ------------------------------------------------------------------------------

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


# -- what an input is -----------------------------------------------------------------------------

def is_manifest(item: str | Path) -> bool:
    """A manifest file (by its suffix), a WebDataset shard (.tar), or a local folder that holds
    manifest files or shards and no images."""
    name = urlsplit(str(item)).path if is_uri(str(item)) else str(item)
    if Path(name).suffix.lower() in (".parquet", ".jsonl", ".tar"):
        return True
    return not is_uri(str(item)) and Path(item).is_dir() and _holds_tables(Path(item))


def _is_shards(item: str | Path) -> bool:
    name = urlsplit(str(item)).path if is_uri(str(item)) else str(item)
    return name.lower().endswith(".tar") or (not is_uri(str(item)) and Path(item).is_dir()
                                             and _holds_tables(Path(item)) and bool(_shard_files(Path(item))))


def _holds_tables(folder: Path) -> bool:
    """Whether a folder holds manifest files or shards and no image: walked only until its first image,
    so telling an image folder of a billion files costs next to nothing."""
    tables = False
    for root, _, names in os.walk(folder):
        for name in names:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES and os.path.isfile(os.path.join(root, name)):
                return False
            tables = tables or (suffix in (*MANIFEST_SUFFIXES, ".tar") and not name.startswith(("_", ".")))
    return tables


def _shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.tar") if p.is_file() and not p.name.startswith(("_", ".")))


def open_inputs(inputs: Sequence[str | Path], part_size: int,
                notes: list[str] | None = None) -> ListInputs | Manifest | Shards:
    """The job's inputs: `Shards` when every input is a WebDataset shard (or a folder of them), a
    `Manifest` when every input is a manifest (CSV files included: then read in place rather than
    listed), else the listed inputs (`collect`)."""
    if inputs and all(_is_shards(i) for i in inputs):
        return Shards([str(p) for i in inputs for p in (_shard_files(Path(i)) if not is_uri(str(i)) and
                                                         Path(i).is_dir() else [i])], part_size)
    if inputs and all(is_manifest(i) or Path(urlsplit(str(i)).path).suffix.lower() == ".csv" for i in inputs):
        if any(_is_shards(i) for i in inputs):
            raise ProtextError("WebDataset shards (.tar) and tabular manifests are two kinds of input: give one kind")
        locations = []
        for item in inputs:
            if not is_uri(str(item)) and Path(item).is_dir():
                locations += [str(p) for p in _manifest_files(Path(item))]
            elif is_uri(str(item)):
                locations.append(str(item))
            else:
                if not Path(item).is_file():
                    kind = {".csv": "CSV", ".jsonl": "JSONL"}.get(Path(item).suffix.lower(), "Parquet")
                    raise ProtextError(f"{item}: no such {kind} file (expected a manifest: a list of image paths)")
                locations.append(str(Path(item)))
        return Manifest(locations, part_size)
    manifests = [str(i) for i in inputs if is_manifest(i)]
    if manifests:
        raise ProtextError(f"{manifests[0]}: a manifest is read in place and cannot be mixed with image files or "
                           f"folders; give manifests alone, or list the images in it")
    return ListInputs(collect(inputs, notes))


Inputs = ListInputs | Manifest | Shards


def as_inputs(given: Sequence | Inputs) -> Inputs:
    """A job's inputs: given as such, or a list of paths, URIs or dataset rows."""
    return given if isinstance(given, (ListInputs, Manifest, Shards)) else ListInputs(given)


def parts_of(inputs: Inputs, part_size: int) -> int:
    return math.ceil(inputs.images / part_size)


# -- helpers -------------------------------------------------------------------------------------

def _manifest_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES
                  and not p.name.startswith(("_", ".")))


def _open(location: str):
    """A seekable binary file, local or through pyarrow's filesystems."""
    if not is_uri(location):
        try:
            return open(location, "rb")
        except OSError as e:
            raise ProtextError(f"{location}: cannot be read ({e.strerror})") from e
    try:
        filesystem, inner = uri_location(location)
        return io.BufferedReader(filesystem.open_input_file(inner))
    except Exception as e:  # missing filesystem packages, credentials, network
        raise ProtextError(f"{location}: cannot be read ({e.__class__.__name__}: {e})") from e


def _size(location: str) -> int:
    if not is_uri(location):
        return Path(location).stat().st_size
    filesystem, inner = uri_location(location)
    return filesystem.get_file_info(inner).size


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ProtextError("Parquet manifests need pyarrow: pip install 'protext[parquet]'") from e
    return pq


def _text(line: bytes, location: str, number: int) -> str:
    try:
        return line.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ProtextError(f"{location}: line {number} is not UTF-8 ({e})") from e


def _json_row(line: bytes, location: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ProtextError(f"{location}: line {number} is not a JSON object ({e})") from e
    if not isinstance(row, dict):
        raise ProtextError(f"{location}: line {number} is not a JSON object")
    return row


def _value(value: Any, kind: str) -> Any:
    """A carried value in its column's type; anything else (nested values, dates) as text."""
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if kind == "float64" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if (kind == "int64" and isinstance(value, int) and not isinstance(value, bool)) or \
            (kind == "bool" and isinstance(value, bool)):
        return value
    return None if value == "" else str(value)


def _base(location: str) -> str | None:
    return location.rsplit("/", 1)[0] if is_uri(location) else str(Path(location).parent)


def _join(base: str, path: str) -> str:
    if is_uri(base):
        if path.startswith("/"):
            parts = urlsplit(base)
            return f"{parts.scheme}://{parts.netloc}{path}"
        return f"{base}/{path}"
    return str(Path(base) / path)

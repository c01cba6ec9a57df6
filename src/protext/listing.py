"""Image folders listed in parallel by Ray tasks, then read like a manifest.

Listing a folder tree of a billion images on one process takes hours on a network file system
and holds every path in memory. With `--engine ray`, `list_on_ray` instead:

1. walks the top of each folder on the driver (at most `LEVELS` levels, until there are about
   `units` subfolders to hand out); the images found up there are written by the driver;
2. shares the subfolders below out to a few Ray tasks (as many as the job's workers: a task's
   process starts once), which list each (sorted) and write its paths as one Parquet file into
   the listing folder (atomically; nothing passes back but counts);
3. returns a `FolderListing`: those files in order, read a part at a time like any manifest.

The result is the single-machine listing exactly (`inputs.collect`: the same paths, named the
same way, in the same order, so the job's settings, parts and resume are the same on both
engines); the driver reads the listing once, a row group at a time, to compute the paths' digest
the job's settings hold. Where the walk meets a link to a folder (which the single-machine
listing follows once, skipping loops) the tree is listed on the driver instead, as
`inputs.collect` does, since links across subfolders cannot be followed once in parallel.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

from .cache import atomic_write
from .errors import ProtextError
from .images import IMAGE_SUFFIXES, is_uri
from .inputs import Manifest, PartInputs, is_manifest

LEVELS = 3  # the driver walks at most this deep before handing subfolders out
ROW_GROUP = 65536  # rows per row group of a listing file: few groups, so the driver's footers stay small


class FolderLinks(Exception):
    """A link to a folder: the tree is listed on the driver instead."""


def listable(paths: Sequence[str | Path]) -> list[Path] | None:
    """The folders, when every input is a local image folder and none lies inside another (the
    single-machine listing removes paths given twice; parallel listings cannot), else None."""
    if not paths or any(is_uri(str(p)) or not Path(p).is_dir() or is_manifest(p) for p in paths):
        return None
    folders = [Path(p) for p in paths]
    real = [Path(os.path.realpath(p)) for p in folders]
    for i, a in enumerate(real):
        if any(i != j and (a == b or b in a.parents) for j, b in enumerate(real)):
            return None
    return folders


def _join(base: str, name: str) -> str:
    """`str(Path(base) / name)`, without making Paths (a task joins millions)."""
    return name if base == "." else base + name if base.endswith("/") else f"{base}/{name}"


def _entries(folder: str, named: str, notes: list[str]) -> list[tuple[bool, str, str]]:
    """A folder's subfolders and images, sorted by name, as (is a folder, path, path as named): the
    order `images.list_images` gives, which sorts paths component by component. An image suffix on a
    link to nothing is noted and skipped, as there."""
    try:
        with os.scandir(folder) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError:  # unreadable: skipped, as os.walk skips it
        return []
    out = []
    for entry in items:
        path, name = _join(folder, entry.name), _join(named, entry.name)
        if entry.is_dir():  # follows links, as os.walk(followlinks=True)
            if entry.is_symlink():
                raise FolderLinks(name)
            out.append((True, path, name))
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            if entry.is_file():
                out.append((False, path, name))
            else:
                notes.append(f"{name}: a link to nothing (dangling); skipped")
    return out


def plan(folder: Path, units: int, notes: list[str]) -> list[tuple[str, list[str] | tuple[str, str]]]:
    """The listing of `folder` in order, as units: ("files", [paths]) the driver writes and
    ("dir", (path, path as named)) a task lists; subfolders are opened level by level until there
    are `units` of them or `LEVELS` levels have been walked."""
    todo: list = [("dir", (str(folder), str(folder)))]
    for _ in range(LEVELS):
        if sum(kind == "dir" for kind, _ in todo) >= units:
            break
        opened: list = []
        for kind, item in todo:
            if kind != "dir":
                opened.append((kind, item))
                continue
            for is_dir, path, name in _entries(*item, notes):
                if is_dir:
                    opened.append(("dir", (path, name)))
                elif opened and opened[-1][0] == "files":
                    opened[-1][1].append(name)
                else:
                    opened.append(("files", [name]))
        if opened == todo:
            break
        todo = opened
    return [u for u in todo if u[0] == "dir" or u[1]]


def list_folder(folder: str, named: str, notes: list[str]) -> list[str]:
    """The images below `folder`, in `images.list_images`'s order, named below `named` (the folder as
    the user gave it); raises `FolderLinks` at a link to a folder."""
    found: list[str] = []
    stack = _entries(folder, named, notes)[::-1]
    while stack:
        is_dir, path, name = stack.pop()
        if is_dir:
            stack.extend(_entries(path, name, notes)[::-1])
        else:
            found.append(name)
    return found


def write_listing(path: str, names: Sequence[str]) -> None:
    """One listing file: a Parquet file with a `path` column, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"path": pa.array(list(names), pa.string())})
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP))


def _list_task(units: list[tuple[str, str, str]]) -> list[dict]:
    """A Ray task: list some subfolders, (folder, named, listing file) each, into their listing files."""
    out = []
    for folder, named, path in units:
        notes: list[str] = []
        try:
            names = list_folder(folder, named, notes)
        except FolderLinks as e:
            return [{"link": str(e)}]
        if names:
            write_listing(path, names)
        out.append({"rows": len(names), "notes": notes})
    return out


class FolderListing(Manifest):
    """Listing files (a `path` column) read as a manifest, with the names and identity of the
    single-machine listing: paths stay as named, and are made absolute against the folder the
    listing was made from (`cwd`) for the workers."""

    def __init__(self, locations: Sequence[str], part_size: int, cwd: str):
        import pyarrow.parquet as pq

        self.cwd = cwd
        super().__init__(locations, part_size)
        digest = hashlib.sha1()  # as cache.sha1("\n".join(names)), a row group at a time
        first = True
        for entry in self.files:
            for batch in pq.ParquetFile(entry.location).iter_batches(ROW_GROUP, columns=["path"]):
                for name in batch.column(0).to_pylist():
                    digest.update(name.encode() if first else b"\n" + name.encode())
                    first = False
        digest.update(b"\0")
        self.paths_sha1 = digest.hexdigest()

    def identity(self) -> dict:
        return {"images": self.images, "paths_sha1": self.paths_sha1}

    def _read(self, entry, start: int, count: int, out: PartInputs, index: int) -> None:
        for _, row in self._parquet_rows(entry, start, count):
            out.names.append(row["path"])
            out.items.append(os.path.join(self.cwd, row["path"]))


def list_on_ray(folders: Sequence[Path], listing: Path, part_size: int, units: int = 64, tasks: int = 8,
                notes: list[str] | None = None) -> FolderListing | None:
    """List `folders` (see `listable`) with at most `tasks` Ray tasks into `listing/` (Ray must be
    initialised), the driver opening subfolders until there are about `units`; None when a link to
    a folder was met (then list them on the driver, `inputs.collect`)."""
    import ray

    notes = notes if notes is not None else []
    listing = Path(listing)
    listing.mkdir(parents=True, exist_ok=True)
    for old in listing.glob("*.parquet"):  # a listing from an earlier run: the folders may have changed
        old.unlink()
    task = ray.remote(_list_task).options(num_cpus=1, max_retries=3)
    files, subfolders, rows = [], [], [0] * len(folders)
    try:
        for k, folder in enumerate(folders):
            for kind, item in plan(folder, units, notes):
                out = str((listing / f"{len(files):06d}.parquet").resolve())
                files.append(out)
                if kind == "files":
                    write_listing(out, item)
                    rows[k] += len(item)
                else:
                    subfolders.append((k, (os.path.abspath(item[0]), item[1], out)))
    except FolderLinks:
        return None
    # a few tasks of many subfolders each: a task's worker process starts once (its imports take seconds)
    tasks = max(1, min(len(subfolders), tasks))
    chunks = [subfolders[i::tasks] for i in range(tasks)]
    for chunk, results in zip(chunks, ray.get([task.remote([u for _, u in chunk]) for chunk in chunks])):
        if any("link" in r for r in results):
            return None
        for (k, (_, _, out)), result in zip(chunk, results):
            rows[k] += result["rows"]
            notes.extend(result["notes"])
            if not result["rows"]:
                files.remove(out)
    for folder, count in zip(folders, rows):
        if not count:
            raise ProtextError(f"{folder}: no image files in this folder or below")
    return FolderListing(files, part_size, os.getcwd())

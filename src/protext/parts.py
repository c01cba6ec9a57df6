"""A folder of one job's parts: what `label` and `features` write, resumable and readable as one table.

A long image job is cut into parts of `part_size` consecutive inputs; part N holds inputs
N*part_size .. (N+1)*part_size-1. The folder holds:

- `_settings.json`: what decides the parts (backbone, head, part size, the input list's hash, ...),
  written first. Reopened with other settings, the folder is refused before any image is read,
  naming what differs; the folder is never changed by the refusal.
- `part-NNNNNN.<suffix>`: one part, written atomically (whole or absent).
- `_parts/NNNNNN.json`: the part's SHA-256, rows and unreadable rows, written after the part.
  Reopening checks every part against it: a part without one (killed between the two files)
  or whose bytes differ (truncated, damaged) is computed again; a part whose bytes are another
  part's (a copy) is refused, since its rows belong elsewhere.
- `_summary.json`: written last, when every part is there: the folder is finished.

Names starting with "_" are skipped by Parquet readers given the folder (pyarrow, pandas, DuckDB,
Spark, Ray Data), so a folder of Parquet parts reads as one table.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from .cache import atomic_write_bytes, atomic_write_json, file_sha256, settings_change, to_json
from .errors import ProtextError

FORMAT = 2  # of part folders: 1 had no per-part digests
SETTINGS_FILE = "_settings.json"
SUMMARY_FILE = "_summary.json"
RECORDS = "_parts"


class PartFolder:
    """The parts of one job in `folder`, opened for writing (`settings` are checked or saved) or for
    reading (`settings` None: the folder must be finished)."""

    def __init__(self, folder: str | Path, suffix: str, settings: dict | None = None, restart: str = ""):
        self.folder, self.suffix, self.restart = Path(folder), suffix, restart
        if self.folder.exists() and not self.folder.is_dir():
            raise ProtextError(f"{self.folder} is a file; it should be the folder the parts are written into")
        self.records: dict[int, dict] = {}
        if settings is None:
            self.settings = self._read_settings()
            self._load_records()
            return
        self.settings = {"format": FORMAT, **settings}
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in list(self.folder.glob(".*.tmp")) + list((self.folder / RECORDS).glob(".*.tmp")):
            stale.unlink(missing_ok=True)  # left by a writer killed mid-file
        self._open(self.settings)

    # -- opening ---------------------------------------------------------------------------
    def _open(self, settings: dict) -> None:
        saved = self.folder / SETTINGS_FILE
        parts = sorted(self.folder.glob(f"part-*{self.suffix}"))
        if parts and not saved.is_file():
            raise ProtextError(f"{self.folder} holds part-*{self.suffix} files that protext did not write (no "
                               f"{SETTINGS_FILE}); give a new or empty folder")
        change = settings_change(saved, settings, self.folder) if parts else None
        if change is not None and change[1]:
            earlier, differ = change
            if earlier.get("format", 1) != FORMAT:
                raise ProtextError(f"{self.folder} was written by an earlier protext (part format "
                                   f"{earlier.get('format', 1)}); {self.restart or 'give a new folder'}")
            if {"images", "paths_sha1"} & set(differ):
                raise ProtextError(f"{self.folder} holds parts of another list of images ({earlier.get('images')} "
                                   f"images then, {settings.get('images')} now, or the same number in another "
                                   f"order): give the same inputs to finish it; {self.restart}")
            raise ProtextError(f"{self.folder} holds parts made with other settings ({', '.join(differ)} differ: "
                               f"{', '.join(f'{k} {earlier.get(k)!r}' for k in differ)} then): rerun with those; "
                               f"{self.restart}")
        if not parts:
            shutil.rmtree(self.folder / RECORDS, ignore_errors=True)
            (self.folder / SUMMARY_FILE).unlink(missing_ok=True)
            atomic_write_json(saved, settings)
        self._load_records()
        self._check_parts(parts)

    def _read_settings(self) -> dict:
        try:
            return json.loads((self.folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ProtextError(f"{self.folder}: no readable {SETTINGS_FILE}; not a folder of parts written by "
                               f"protext ({e.__class__.__name__})") from e

    def _load_records(self) -> None:
        for path in sorted((self.folder / RECORDS).glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                self.records[int(path.stem)] = {k: record[k] for k in ("sha256", "rows", "unreadable")}
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # a damaged record: its part is computed again

    def _check_parts(self, parts: list[Path]) -> None:
        """Keep the parts whose bytes are those their record names; redo the others; refuse copies."""
        indices = {self._index(p): p for p in parts}
        with ThreadPoolExecutor(4) as pool:  # hashing releases the GIL
            digests = dict(zip(indices, pool.map(file_sha256, indices.values())))
        owners = {r["sha256"]: i for i, r in self.records.items()}
        for index, digest in digests.items():
            record = self.records.get(index)
            if record is not None and record["sha256"] == digest:
                continue
            if digest in owners and owners[digest] != index:
                raise ProtextError(f"{indices[index]} is a copy of part {owners[digest]} ({self.path(owners[digest])}), "
                                   f"not the part its name says; remove it and rerun the same command")
            self._drop(index)
        for index in [i for i in self.records if i not in digests]:
            self._drop(index)  # a record without its part
        if any(i not in self.records for i in digests):
            (self.folder / SUMMARY_FILE).unlink(missing_ok=True)

    def _index(self, path: Path) -> int:
        stem = path.name[len("part-"): len(path.name) - len(self.suffix)]
        if not stem.isdigit():
            raise ProtextError(f"{path}: not a part file protext writes (part-NNNNNN{self.suffix})")
        return int(stem)

    def _drop(self, index: int) -> None:
        self.path(index).unlink(missing_ok=True)
        (self.folder / RECORDS / f"{index:06d}.json").unlink(missing_ok=True)
        self.records.pop(index, None)
        (self.folder / SUMMARY_FILE).unlink(missing_ok=True)

    # -- parts -----------------------------------------------------------------------------
    def path(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}{self.suffix}"

    def done(self, index: int) -> bool:
        return index in self.records

    def missing(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if i not in self.records]

    def write(self, index: int, data: bytes, rows: int, unreadable: int) -> None:
        """One part, atomically, then its record."""
        atomic_write_bytes(self.path(index), data)
        record = {"sha256": file_sha256(self.path(index)), "rows": rows, "unreadable": unreadable}
        atomic_write_json(self.folder / RECORDS / f"{index:06d}.json", record)
        self.records[index] = record

    def read(self, index: int) -> bytes:
        """A part's bytes, checked against its record."""
        path = self.path(index)
        record = self.records.get(index)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ProtextError(f"{path}: missing ({e.strerror}); {self.restart or 'rerun the command that wrote it'}") from e
        import hashlib

        if self.settings.get("format", 1) < FORMAT:  # written before parts had digests
            return data
        if record is None or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ProtextError(f"{path}: not the part that was written (its digest differs: truncated or "
                               f"damaged); rerun the command that wrote it to compute it again")
        return data

    # -- the whole ---------------------------------------------------------------------------
    def finish(self, parts: int, extra: dict | None = None) -> dict:
        """Check every part 0..parts-1 is there and write the summary; returns it."""
        absent = self.missing(range(parts))
        if absent:
            raise ProtextError(f"{self.folder}: parts {absent[:5]} are missing; rerun the same command")
        summary = {**self.settings, "parts": parts, "rows": sum(self.records[i]["rows"] for i in range(parts)),
                   "unreadable": sum(self.records[i]["unreadable"] for i in range(parts)), **(extra or {})}
        atomic_write_json(self.folder / SUMMARY_FILE, summary)
        return summary

    def summary(self) -> dict:
        """The summary of a finished folder, or an error saying what the folder is."""
        path = self.folder / SUMMARY_FILE
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(summary, dict) or not isinstance(summary.get("parts"), int):
                raise ValueError("no part count")
        except (OSError, ValueError) as e:
            raise ProtextError(f"{self.folder}: an unfinished folder ({SUMMARY_FILE} is missing or unreadable: "
                               f"{e.__class__.__name__}); rerun the command that made it") from e
        return summary

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def jsonl(rows: Iterable[dict]) -> bytes:
    """Rows as JSON lines, the form label parts are kept in."""
    return "".join(to_json(r, indent=None) + "\n" for r in rows).encode()

"""Atomic files and a resumable on-disk feature store.

Everything protext writes that took compute to make (targets, image features, checkpoints)
goes through `atomic_*`: the file appears whole or not at all, so a run killed at any moment
leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ProtextError

# Files are created private by mkstemp; they get the permissions any other new file would.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` to fill a temporary file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path: str | Path, what: str, folder: bool = False) -> None:
    """Refuse, before any work, a file (`folder` False: its folder) or folder protext could not write,
    naming it and the flag or setting it came from. Nothing is left behind: the nearest folder that
    exists is probed with a file created and removed at once."""
    target = Path(path).absolute() if folder else Path(path).absolute().parent
    try:
        existing = target
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file, not a folder")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".protext-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ProtextError(f"{what} {path}: cannot be written ({e.strerror or e}); give a folder you can write "
                           f"to") from e


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def finite(obj: object) -> object:
    """`obj` with every NaN or infinite float replaced by None: JSON has no NaN, and a bare
    `NaN` in a report breaks strict readers (browsers, jq, most JSON libraries)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj: object, indent: int | None = 2) -> str:
    """Strict JSON (non-finite numbers as null), non-ASCII text kept as it is."""
    return json.dumps(finite(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (to_json(obj) + "\n").encode())


def settings_change(path: Path, settings: dict, folder: Path) -> tuple[dict, list[str]] | None:
    """The settings an earlier run of a resumable job saved at `path`, and the keys whose value
    differs from `settings` (compared as JSON, either side's keys); None when none were saved.
    An unreadable file is an error that says how to start over (delete `folder`)."""
    if not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ProtextError(f"{path}: unreadable ({e}); delete {folder} to start over") from e
    now = json.loads(to_json(settings))
    return earlier, [k for k in {**now, **earlier} if earlier.get(k) != now.get(k)]


def remove_stale_temporaries(folder: Path, names: Sequence[str]) -> None:
    """Delete temporary files that a killed writer of `names` left in `folder`."""
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never a pickle), with an error that names the file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ProtextError(f"{path}: not a readable safetensors file ({e})") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha1(*parts: str) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


class FeatureStore:
    """Feature vectors keyed by strings, stored as atomic safetensors shards in one folder.

    `get(keys, compute)` returns a (len(keys), dim) tensor, computing only the keys no earlier
    run stored. Each computed chunk is written as its own shard before the next one starts, so
    an interrupted computation resumes at the chunk it stopped in.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index: dict[str, tuple[Path, int]] = {}
        self._loaded: dict[Path, torch.Tensor] = {}
        if self.folder.is_dir():
            for shard in sorted(self.folder.glob("shard-*.safetensors")):
                keys = self._shard_keys(shard)
                for i, k in enumerate(keys):
                    self.index[k] = (shard, i)

    @staticmethod
    def _shard_keys(shard: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as f:
                return json.loads(f.metadata()["keys"])
        except Exception:  # a foreign or damaged file is ignored: its keys get recomputed
            return []

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _rows(self, shard: Path) -> torch.Tensor:
        if shard not in self._loaded:
            self._loaded[shard] = load_tensors(shard)["features"]
        return self._loaded[shard]

    def missing(self, keys: Sequence[str]) -> list[int]:
        """Positions of the keys not stored yet (each distinct key once)."""
        out, seen = [], set()
        for i, k in enumerate(keys):
            if k not in self.index and k not in seen:
                out.append(i)
                seen.add(k)
        return out

    def put(self, keys: Sequence[str], feats: torch.Tensor) -> None:
        """Store one shard, atomically; after this the keys survive any interruption."""
        feats = feats.float().cpu()
        shard = self.folder / f"shard-{sha1(*keys)[:16]}.safetensors"
        atomic_save_tensors(shard, {"features": feats}, {"keys": json.dumps(list(keys))})
        self._loaded[shard] = feats
        for j, k in enumerate(keys):
            self.index[k] = (shard, j)

    def stack(self, keys: Sequence[str]) -> torch.Tensor:
        if not keys:
            return torch.empty(0)
        return torch.stack([self._rows(self.index[k][0])[self.index[k][1]] for k in keys])

    def get(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], torch.Tensor],
        chunk: int = 2048,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """`compute(positions)` encodes `keys[p]` for each position p not yet stored."""
        missing = self.missing(keys)
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            self.put([keys[i] for i in part], compute(part))
            if progress:
                progress(len(part))
        return self.stack(keys)

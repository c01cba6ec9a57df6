"""`Context`: where a run keeps its caches, which device it computes on, whether it shows progress.

Passed whole to everything that encodes, trains or reads images, instead of a cache folder and a
progress switch threaded separately through every signature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    """`$PROTEXT_CACHE`, else `~/.cache/protext`."""
    return Path(os.environ.get("PROTEXT_CACHE") or Path.home() / ".cache" / "protext")


@dataclass(frozen=True)
class Context:
    """The run-wide settings every command shares; each field is a flag (`flags.add_flags`)."""

    cache_dir: Path | None = field(default=None, metadata={
        "help": "cache for downloads and features (default: $PROTEXT_CACHE or ~/.cache/protext)"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda when available)"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr"})

    @property
    def cache(self) -> Path:
        """The cache folder: `cache_dir`, else `$PROTEXT_CACHE`, else `~/.cache/protext`."""
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def bar(self, total: int | None = None, desc: str = "", unit: str = "it", show: bool = True, **kw):
        """A tqdm progress bar, shown when this run shows progress and `show` says so."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not (self.progress and show), **kw)


QUIET = Context(progress=False)

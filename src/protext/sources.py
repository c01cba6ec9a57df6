"""Public description sets, by name, downloaded once into the cache.

Names are `cupl:<dataset>` (CuPL's GPT-3 descriptions; `cupl:imagenet` is the set ProText
trains its cross-dataset prompts on; CuPL has no EuroSAT set, so `cupl:eurosat` is the
CuPL-style one published with ProText). Files are pinned to a commit so a name always means
the same bytes.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from .cache import atomic_write_bytes, default_cache_dir
from .errors import ProtextError

_CUPL = "https://raw.githubusercontent.com/sarahpratt/CuPL/719619c829792ff8f37298266e941b7f077c7f5c/all_prompts"

SOURCES: dict[str, str] = {
    "cupl:imagenet": f"{_CUPL}/base_prompts/imagenet_prompts_base.json",
    "cupl:caltech101": f"{_CUPL}/full_prompts/cal_prompts_full.json",
    "cupl:oxford_pets": f"{_CUPL}/full_prompts/pets_prompts_full.json",
    "cupl:stanford_cars": f"{_CUPL}/full_prompts/cars_prompts_full.json",
    "cupl:oxford_flowers": f"{_CUPL}/full_prompts/flower_prompts_full.json",
    "cupl:food101": f"{_CUPL}/full_prompts/food_prompts_full.json",
    "cupl:fgvc_aircraft": f"{_CUPL}/full_prompts/airplane_prompts_full.json",
    "cupl:sun397": f"{_CUPL}/full_prompts/sun_prompts_full.json",
    "cupl:dtd": f"{_CUPL}/full_prompts/texture_prompts_full.json",
    "cupl:ucf101": f"{_CUPL}/full_prompts/ucf_prompts_full.json",
    "cupl:cifar10": f"{_CUPL}/full_prompts/cifar10_prompts_full.json",
    "cupl:cifar100": f"{_CUPL}/full_prompts/cifar100_prompts_full.json",
    "cupl:eurosat": "https://raw.githubusercontent.com/muzairkhattak/ProText/"
                    "acd9918452a559d58c482a7400f858569c0283ab/templates/EuroSAT.json",
}


def cached_path(name: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "descriptions" / (name.replace(":", "-") + ".json")


def fetch(name: str, cache_dir: Path | None = None, timeout: float = 30.0) -> Path:
    """Download the named set into the cache (once) and return its path."""
    if name not in SOURCES:
        raise ProtextError(f"unknown description set {name!r}; known: {', '.join(sorted(SOURCES))}")
    path = cached_path(name, cache_dir)
    if path.is_file():
        return path
    url = SOURCES[name]
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ProtextError(
            f"could not download description set {name!r} from {url} ({e}).\n"
            f"Download that file where there is internet and either pass its path as --descriptions, "
            f"or place it at {path}"
        ) from e
    atomic_write_bytes(path, data)
    return path


def resolve(spec: str, cache_dir: Path | None = None) -> Path:
    """A description source: a known set name (downloaded if needed) or a file path."""
    if spec in SOURCES:
        return fetch(spec, cache_dir)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ProtextError(f"{spec}: no such description file, and not a known set ({', '.join(sorted(SOURCES))})")
    return path

"""Public description sets, by name, downloaded once into the cache.

Names are `cupl:<dataset>` (CuPL's GPT-3 descriptions; `cupl:imagenet` is the set ProText
trains its cross-dataset prompts on; CuPL has no EuroSAT set, so `cupl:eurosat` is the
CuPL-style one published with ProText) and `dclip:<dataset>` (DCLIP's descriptors). Files are pinned to a commit so a name always means
the same bytes.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from .cache import atomic_write_bytes
from .context import Context
from .errors import ProtextError

_CUPL = "https://raw.githubusercontent.com/sarahpratt/CuPL/719619c829792ff8f37298266e941b7f077c7f5c/all_prompts"

# The one list of public CuPL-style sets: dataset name -> file. Set names, URLs and the
# dataset a file belongs to ("airplane_prompts_full.json" -> fgvc_aircraft) all come from it.
CUPL_FILES: dict[str, str] = {
    "imagenet": f"{_CUPL}/base_prompts/imagenet_prompts_base.json",
    "caltech101": f"{_CUPL}/full_prompts/cal_prompts_full.json",
    "oxford_pets": f"{_CUPL}/full_prompts/pets_prompts_full.json",
    "stanford_cars": f"{_CUPL}/full_prompts/cars_prompts_full.json",
    "oxford_flowers": f"{_CUPL}/full_prompts/flower_prompts_full.json",
    "food101": f"{_CUPL}/full_prompts/food_prompts_full.json",
    "fgvc_aircraft": f"{_CUPL}/full_prompts/airplane_prompts_full.json",
    "sun397": f"{_CUPL}/full_prompts/sun_prompts_full.json",
    "dtd": f"{_CUPL}/full_prompts/texture_prompts_full.json",
    "ucf101": f"{_CUPL}/full_prompts/ucf_prompts_full.json",
    "cifar10": f"{_CUPL}/full_prompts/cifar10_prompts_full.json",
    "cifar100": f"{_CUPL}/full_prompts/cifar100_prompts_full.json",
    "eurosat": "https://raw.githubusercontent.com/muzairkhattak/ProText/"
               "acd9918452a559d58c482a7400f858569c0283ab/templates/EuroSAT.json",
}
_DCLIP = ("https://raw.githubusercontent.com/sachit-menon/classify_by_description_release/"
          "d1a3d8920af89bd0d6a692ed3afeb277df46e082/descriptors")
_WAFFLE = "https://raw.githubusercontent.com/ExplainableML/WaffleCLIP/7a1b8ee48e31285f62ecd839fecb6b89cbef81f1/descriptors"
# DCLIP's descriptor files (`{class: ["has a long neck", ...]}`); WaffleCLIP published three more.
DCLIP_FILES: dict[str, str] = {
    "imagenet": f"{_DCLIP}/descriptors_imagenet.json",
    "cub": f"{_DCLIP}/descriptors_cub.json",
    "dtd": f"{_DCLIP}/descriptors_dtd.json",
    "eurosat": f"{_DCLIP}/descriptors_eurosat.json",
    "food101": f"{_DCLIP}/descriptors_food101.json",
    "oxford_pets": f"{_DCLIP}/descriptors_pets.json",
    "places365": f"{_DCLIP}/descriptors_places365.json",
    "stanford_cars": f"{_WAFFLE}/descriptors_cars.json",
    "fgvc_aircraft": f"{_WAFFLE}/descriptors_fgvcaircraft.json",
    "oxford_flowers": f"{_WAFFLE}/descriptors_flowers102.json",
}
_AWT = ("https://raw.githubusercontent.com/MCG-NJU/AWT/b2b49a8fd932bd322cd2515e7bad87bdd132be65/AWT_zero_shot/"
        "descriptions/image_datasets")
# AWT's dataset-aware descriptions (about 50 a class, from its two-step LLM prompting).
AWT_FILES: dict[str, str] = {d: f"{_AWT}/{d}.json" for d in (
    "caltech101", "caltech256", "cub", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagenet_r", "oxford_flowers",
    "oxford_pets", "stanford_cars", "sun397", "ucf101")}
_MPVR = "https://raw.githubusercontent.com/jmiemirza/Meta-Prompting/fb82b79f4f85b6ff727c07ad9ab54d668820b111/descriptions"
# MPVR's meta-prompted descriptions (LLM-written task templates, then descriptions from each), by its GPT
# model; `mpvr-mixtral:NAME` for those of Mixtral.
_MPVR_NAMES = {"cifar10": "CIFAR10_local", "cifar100": "CIFAR100_local", "cub": "CUBS200", "caltech101": "Caltech101",
               "dtd": "DescribableTextures", "eurosat": "EuroSAT", "fgvc_aircraft": "FGVCAircraft",
               "food101": "Food101", "imagenet": "ImageNet", "imagenet_r": "ImageNetR",
               "imagenet_sketch": "ImageNetSketch", "imagenetv2": "ImageNetV2", "oxford_flowers": "OxfordFlowers",
               "oxford_pets": "OxfordPets", "resisc45": "RESISC45", "sun397": "SUN397", "stanford_cars": "StanfordCars",
               "ucf101": "UCF101", "kinetics400": "kinetics400", "places365": "places365"}
MPVR_FILES: dict[str, str] = {d: f"{_MPVR}/gpt/{f}.json" for d, f in _MPVR_NAMES.items()}
MPVR_MIXTRAL_FILES: dict[str, str] = {d: f"{_MPVR}/mixtral/{f}.json" for d, f in _MPVR_NAMES.items()}
SOURCES: dict[str, str] = {**{f"cupl:{dataset}": url for dataset, url in CUPL_FILES.items()},
                           **{f"dclip:{dataset}": url for dataset, url in DCLIP_FILES.items()},
                           **{f"awt:{dataset}": url for dataset, url in AWT_FILES.items()},
                           **{f"mpvr:{dataset}": url for dataset, url in MPVR_FILES.items()},
                           **{f"mpvr-mixtral:{dataset}": url for dataset, url in MPVR_MIXTRAL_FILES.items()}}
DESCRIPTION_KINDS = ("cupl:", "awt:", "mpvr:", "mpvr-mixtral:")  # the sets --descriptions takes


def _short(stem: str) -> str:
    return stem.removesuffix("_prompts_full").removesuffix("_prompts_base").removeprefix("descriptors_")


# File stems without their suffix or prefix ("texture" for texture_prompts_full.json, "pets" for
# descriptors_pets.json) -> dataset
_FILE_DATASETS = {_short(url.rsplit("/", 1)[-1].removesuffix(".json").lower()): d
                  for files in (CUPL_FILES, DCLIP_FILES, MPVR_FILES) for d, url in files.items()}


def dataset_of(set_name: str) -> str | None:
    """The dataset a description set belongs to, from its name: a set name ("cupl:dtd"), its cache
    file ("cupl-dtd"), CuPL's file name ("texture_prompts_full") or the dataset ("dtd");
    None when unknown. Class names of that set then get that dataset's templates."""
    name = set_name.lower().rsplit("/", 1)[-1].removesuffix(".json")
    for prefix in ("cupl", "dclip", "awt", "mpvr-mixtral", "mpvr"):
        name = name.removeprefix(prefix + ":").removeprefix(prefix + "-")
    name = _FILE_DATASETS.get(_short(name), _short(name))
    known = (CUPL_FILES, DCLIP_FILES, AWT_FILES, MPVR_FILES)
    return name if any(name in files for files in known) or name.startswith("imagenet") else None


def cached_path(name: str, ctx: Context = Context()) -> Path:
    return ctx.cache / "descriptions" / (name.replace(":", "-") + ".json")


def fetch(name: str, ctx: Context = Context(), timeout: float = 30.0) -> Path:
    """Download the named set into the cache (once) and return its path."""
    if name not in SOURCES:
        raise ProtextError(f"unknown description set {name!r}; known: {', '.join(sorted(SOURCES))}")
    path = cached_path(name, ctx)
    if path.is_file():
        return path
    url = SOURCES[name]
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ProtextError(
            f"could not download description set {name!r} from {url} ({e}).\n"
            f"Download that file where there is internet and either pass its path as "
            f"{'--descriptors' if name.startswith('dclip:') else '--descriptions'}, "
            f"or place it at {path}"
        ) from e
    atomic_write_bytes(path, data)
    return path


# Class names of the usual (CLIP-style) ImageNet list that DCLIP's ImageNet file spells by WordNet.
DCLIP_ALIASES = {"newt": "eft", "tights": "maillot"}


def _with_aliases(data: dict[str, list[str]]) -> dict[str, list[str]]:
    return {**data, **{name: data[alias] for name, alias in DCLIP_ALIASES.items() if alias in data and name not in data}}


def load_descriptors(spec: str, ctx: Context = Context(), published: bool | None = None) -> dict[str, list[str]]:
    """DCLIP descriptors from a file or a public set name (dclip:NAME).

    The published files leave some classes' lists empty or blank; for those sets only, such a
    class gets DCLIP's own convention (one empty descriptor). In any other file an empty list is
    an error naming the class. `published` says whether a file is such a copy (default: whether
    `spec` is a set name)."""
    from .descriptions import load_descriptions, normalize_name, read_json

    path = resolve(spec, ctx, "dclip:")
    if not (spec in SOURCES if published is None else published):
        return _with_aliases(load_descriptions(path, item="descriptor"))
    raw = read_json(path, "descriptor file")
    empty = [k for k, v in raw.items() if isinstance(v, list) and not any(str(d).strip() for d in v)] \
        if isinstance(raw, dict) else []
    data = load_descriptions(path, item="descriptor", skip=set(empty))
    return _with_aliases({**data, **{normalize_name(k): [""] for k in empty}})


def resolve(spec: str, ctx: Context = Context(), kind: str = "") -> Path:
    """A description source: a known set name (downloaded if needed) or a file path. `kind`
    ("cupl:", "dclip:") says which sets the error lists when neither is found."""
    if spec in SOURCES:
        return fetch(spec, ctx)
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "descriptor" if kind == "dclip:" else "description"
        kinds = DESCRIPTION_KINDS if kind == "cupl:" else (kind,)
        known = sorted(n for n in SOURCES if n.startswith(kinds))
        raise ProtextError(f"{spec}: no such {what} file, and not a known set ({', '.join(known)})")
    return path

"""Image datasets: the CoOp folder layouts and split files, image folders, and CSV files.

Every loader returns a `Dataset`: class names in label order, (path, label) samples, and
notes on what looks wrong but is not fatal (class folders without images), for the CLI to
print. Text files may start with a UTF-8 BOM, as Excel and Notepad write them.
The CoOp layouts (DATASETS.md of CoOp) under one data root:

    caltech-101/101_ObjectCategories/   caltech-101/split_zhou_Caltech101.json
    oxford_pets/images/                 oxford_pets/split_zhou_OxfordPets.json
    stanford_cars/                      stanford_cars/split_zhou_StanfordCars.json
    oxford_flowers/jpg/                 oxford_flowers/split_zhou_OxfordFlowers.json
    food-101/images/                    food-101/split_zhou_Food101.json
    fgvc_aircraft/images/               fgvc_aircraft/variants.txt, images_variant_{train,val,test}.txt
    sun397/SUN397/                      sun397/split_zhou_SUN397.json
    dtd/images/                         dtd/split_zhou_DescribableTextures.json
    eurosat/2750/                       eurosat/split_zhou_EuroSAT.json
    ucf101/UCF-101-midframes/           ucf101/split_zhou_UCF101.json
    imagenet/images/{train,val}/<wnid>/ imagenet/classnames.txt ("n01440764 tench" per line)
    imagenetv2/imagenetv2-matched-frequency-format-val/<label>/
    imagenet-sketch/images/<wnid>/
    imagenet-adversarial/imagenet-a/<wnid>/   (200 classes)
    imagenet-rendition/imagenet-r/<wnid>/     (200 classes)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, TextIO

from ..errors import ProtextError
from ..hub_datasets import is_hub_dataset, open_dataset
from ..images import list_images

# name: (folder under the data root, image folder inside it, split file)
SPLIT_DATASETS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
IMAGENET_VARIANTS = {  # name: (folder, image folder, class folders named by wnid?)
    "imagenet_sketch": ("imagenet-sketch", "images", True),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", True),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", True),
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", False),
}
DATASETS = ("imagenet", *SPLIT_DATASETS, "fgvc_aircraft", *IMAGENET_VARIANTS)
CROSS_DATASET_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                         "sun397", "dtd", "eurosat", "ucf101")
DOMAIN_SHIFTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


@dataclass
class Dataset:
    """`notes`: warnings for the user, e.g. classes kept (so labels keep their order) without images."""

    name: str
    split: str
    classes: list[str]
    samples: list[tuple[Path, int]]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.samples:
            raise ProtextError(f"{self.name} ({self.split}): no images found")


def display_name(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def load_dataset(name: str, root: str | Path, split: str = "test") -> Dataset:
    """A dataset by name (see DATASETS), or `folder` (root/class/*.jpg), or `csv` (a path,label file),
    or `hf:OWNER/NAME[:SPLIT]` / `hf:FOLDER` (a Hugging Face dataset; `root` unused)."""
    if is_hub_dataset(name):  # its own split, else --split (its test split, else validation, else train)
        return hub_dataset(name, None if split == "test" else {"val": "validation"}.get(split, split))
    root = Path(root).expanduser()
    if split not in ("train", "val", "test"):
        raise ProtextError(f"split must be train, val or test, got {split!r}")
    if name == "folder":
        return image_folder(root, split)
    if name == "csv":
        return csv_dataset(root, split)
    if name in SPLIT_DATASETS:
        return _split_file_dataset(name, root, split)
    if name == "fgvc_aircraft":
        return _aircraft(root, split)
    if name == "imagenet":
        return _imagenet(root, split)
    if name in IMAGENET_VARIANTS:
        return _imagenet_variant(name, root)
    raise ProtextError(f"unknown dataset {name!r}; choose from folder, csv, {', '.join(DATASETS)}")


def hub_dataset(spec: str, split: str | None = None) -> Dataset:
    """A Hugging Face dataset split (`hub_datasets.open_dataset`) with its ClassLabel names as classes."""
    hub = open_dataset(spec, split)
    if hub.classes is None:
        raise ProtextError(f"--dataset {spec}: no label column (a ClassLabel feature), so nothing to evaluate against")
    return Dataset(hub.name, hub.split, hub.classes, [(hub.image(i), label) for i, label in enumerate(hub.labels())])


def _read_text(path: Path) -> str:
    """UTF-8 text without a leading BOM, which would otherwise stick to the first line's first field."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProtextError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e


def _class_folders(folder: Path, names: Sequence[str]) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image, label) for the images in each `folder/<name>`, label = position in `names`; and the
    names whose folder is missing or holds no images."""
    samples, empty = [], []
    for label, name in enumerate(names):
        images = list_images(folder / name)
        samples.extend((p, label) for p in images)
        if not images:
            empty.append(name)
    return samples, empty


def _empty_note(folder: Path, empty: Sequence[str], total: int, shown: int = 10) -> list[str]:
    """One note naming the class folders under `folder` without images; such classes are kept so
    that labels keep their order, but they only ever act as distractors."""
    if not empty:
        return []
    more = f", ... and {len(empty) - shown} more" if len(empty) > shown else ""
    return [f"{folder}: {len(empty)} of {total} class folders are missing or hold no images; their classes are kept "
            f"with no images: {', '.join(empty[:shown])}{more}"]


def _dataset_dir(root: Path, folder: str, marker: str) -> Path:
    """The dataset folder: `root/folder`, or `root` itself when it already is that folder."""
    for candidate in (root / folder, root):
        if (candidate / marker).exists():
            return candidate
    raise ProtextError(f"expected {root / folder / marker} (CoOp layout: <data root>/{folder}/{marker}); "
                       f"pass the data root that holds '{folder}/'")


def _check_images(dataset: Dataset, image_dir: Path) -> Dataset:
    probe = dataset.samples[:20]
    if not any(p.exists() for p, _ in probe):
        raise ProtextError(f"{dataset.name}: none of the first listed images exist, e.g. {probe[0][0]}; "
                           f"expected the images under {image_dir}")
    return dataset


def _split_file_dataset(name: str, root: Path, split: str) -> Dataset:
    folder, image_dir, split_file = SPLIT_DATASETS[name]
    base = _dataset_dir(root, folder, split_file)
    path = base / split_file
    try:
        raw = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ProtextError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(raw, dict) or split not in raw:
        raise ProtextError(f"{path}: expected an object with a '{split}' list")
    names: dict[int, str] = {}
    samples = []
    for i, item in enumerate(raw[split]):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[1], int)):
            raise ProtextError(f"{path}: '{split}' item {i} should be [relative path, label, class name], got {item!r}")
        rel, label, cname = item
        names.setdefault(label, display_name(str(cname)))
        samples.append((base / image_dir / rel, label))
    classes = _dense(names, path)
    return _check_images(Dataset(name, split, classes, samples), base / image_dir)


def _dense(names: dict[int, str], where: Path | str) -> list[str]:
    labels = sorted(names)
    if labels != list(range(len(labels))):
        raise ProtextError(f"{where}: labels should run 0..{len(labels) - 1}; found gaps")
    return [names[i] for i in labels]


def _aircraft(root: Path, split: str) -> Dataset:
    base = _dataset_dir(root, "fgvc_aircraft", "variants.txt")
    variants = [v.strip() for v in _read_text(base / "variants.txt").splitlines() if v.strip()]
    index = {v: i for i, v in enumerate(variants)}
    listing = base / f"images_variant_{split}.txt"
    if not listing.is_file():
        raise ProtextError(f"expected {listing} (lines 'image_id variant')")
    samples = []
    for n, line in enumerate(_read_text(listing).splitlines()):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in index:
            raise ProtextError(f"{listing}, line {n + 1}: variant {variant!r} is not in variants.txt")
        samples.append((base / "images" / f"{image_id}.jpg", index[variant]))
    return _check_images(Dataset("fgvc_aircraft", split, variants, samples), base / "images")


def read_imagenet_classnames(candidates: list[Path]) -> dict[str, str]:
    """wnid -> class name from a classnames.txt ("n01440764 tench" per line)."""
    for path in candidates:
        if path.is_file():
            out = {}
            for n, line in enumerate(_read_text(path).splitlines()):
                wnid, _, cname = line.strip().partition(" ")
                if not wnid:
                    continue
                if not cname:
                    raise ProtextError(f"{path}, line {n + 1}: expected 'wnid class name'")
                out[wnid] = cname.strip()
            return out
    raise ProtextError("ImageNet class names not found; expected classnames.txt ('n01440764 tench' per line) at "
                       + " or ".join(str(c) for c in candidates))


def _imagenet(root: Path, split: str) -> Dataset:
    base = _dataset_dir(root, "imagenet", "images")
    names = read_imagenet_classnames([base / "classnames.txt"])
    wnids = sorted(names)
    folder = base / "images" / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise ProtextError(f"expected {folder} with one folder per wnid")
    samples, empty = _class_folders(folder, wnids)
    return Dataset("imagenet", split, [names[w] for w in wnids], samples, _empty_note(folder, empty, len(wnids)))


def _imagenet_variant(name: str, root: Path) -> Dataset:
    folder, image_dir, by_wnid = IMAGENET_VARIANTS[name]
    base = _dataset_dir(root, folder, image_dir)
    names = read_imagenet_classnames([base / "classnames.txt", root / "imagenet" / "classnames.txt",
                                      root / "classnames.txt"])
    wnids = sorted(names)
    images = base / image_dir
    present = sorted(d.name for d in images.iterdir() if d.is_dir())
    if by_wnid:
        unknown = [w for w in present if w not in names]
        if unknown:
            raise ProtextError(f"{images}: folders {unknown[:3]} are not wnids listed in classnames.txt")
        keep = [w for w in wnids if w in set(present)]  # A and R hold 200 of the 1000 classes
        samples, empty = _class_folders(images, keep)
        return Dataset(name, "test", [names[w] for w in keep], samples, _empty_note(images, empty, len(keep)))
    numbered = {int(d): d for d in present if d.isdigit()}  # folders 0..999, in classnames.txt order
    beyond = [d for i, d in sorted(numbered.items()) if i >= len(wnids)]
    if beyond:
        raise ProtextError(f"{images}: folders {beyond[:3]} are not class numbers 0..{len(wnids) - 1} of classnames.txt")
    samples, empty = _class_folders(images, [numbered.get(i, str(i)) for i in range(len(wnids))])
    return Dataset(name, "test", [names[w] for w in wnids], samples, _empty_note(images, empty, len(wnids)))


def image_folder(root: Path, split: str = "test") -> Dataset:
    """root/<class name>/<image>: classes in sorted folder order; empty class folders are noted."""
    if not root.is_dir():
        raise ProtextError(f"{root}: expected a folder with one sub-folder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ProtextError(f"{root}: no class sub-folders (expected {root}/<class name>/<image>)")
    samples, empty = _class_folders(root, classes)
    return Dataset(root.name, split, [display_name(c) for c in classes], samples, _empty_note(root, empty, len(classes)))


def csv_dataset(path: Path, split: str = "test") -> Dataset:
    """A CSV of `path,label` (label = class name; a header row is allowed); paths relative to the CSV."""
    if not path.is_file():
        raise ProtextError(f"{path}: no such CSV file (expected rows 'path,label')")
    classes: dict[str, int] = {}
    samples = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        for line, row in _csv_rows(f, path):
            if line == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) != 2:
                raise ProtextError(f"{path}, line {line}: expected 'path,label', got {row!r}")
            image, label = row[0].strip(), display_name(row[1])
            samples.append((path.parent / image, classes.setdefault(label, len(classes))))
    return Dataset(path.stem, split, list(classes), samples)


def _csv_rows(f: TextIO, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line the row starts on, row) for the non-blank rows; a quoted field may span lines, so
    the count comes from the reader, not from splitting the text."""
    reader = csv.reader(f)
    start = 1
    try:
        for row in reader:
            if row and "".join(row).strip():
                yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise ProtextError(f"{path}, line {reader.line_num}: {e} (expected rows 'path,label')") from e
    except UnicodeDecodeError as e:
        raise ProtextError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from e


def split_base_novel(classes: Sequence) -> tuple[list, list]:
    """CoOp's rule: in label order, the first ceil(n/2) classes are base, the rest novel."""
    k = math.ceil(len(classes) / 2)
    return list(classes[:k]), list(classes[k:])


def base_novel(dataset: Dataset, subset: str) -> Dataset:
    """The base or novel half of `dataset` (see `split_base_novel`), relabelled 0..k-1."""
    if subset == "all":
        return dataset
    if subset not in ("base", "novel"):
        raise ProtextError(f"subset must be all, base or novel, got {subset!r}")
    base, novel = split_base_novel(range(len(dataset.classes)))
    keep = base if subset == "base" else novel
    remap = {old: new for new, old in enumerate(keep)}
    samples = [(p, remap[label]) for p, label in dataset.samples if label in remap]
    if not samples:
        names = ", ".join(dataset.classes[i] for i in keep[:5]) + (" ..." if len(keep) > 5 else "")
        raise ProtextError(f"{dataset.name} ({dataset.split}): its {subset} half ({len(keep)} of "
                           f"{len(dataset.classes)} classes: {names}) has no images")
    return Dataset(dataset.name, dataset.split, [dataset.classes[i] for i in keep], samples, dataset.notes)

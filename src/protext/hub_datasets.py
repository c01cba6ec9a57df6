"""Hugging Face `datasets` as image inputs: `--dataset hf:OWNER/NAME[:SPLIT]`, or a local folder.

Most labelled evaluation sets live on the Hub as `datasets` with an image column and a label
column. `open_dataset("hf:food101:validation")` loads one (a Hub id, a folder written by
`save_to_disk`, or an image folder of `<class>/<image>`, read by `datasets`' imagefolder) and
gives its rows as image sources the image engine reads one at a time (never the whole set in
memory), its class names from the label column's `ClassLabel`, and a key per row that changes
when the data does (the dataset's fingerprint and the row), for the feature cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .cache import sha1
from .errors import ProtextError

PREFIX = "hf:"


def is_hub_dataset(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _module():
    try:
        import datasets
    except ImportError as e:
        raise ProtextError("--dataset hf:... needs the datasets package: pip install -e '.[datasets]' (protext's "
                           "'datasets' extra)") from e
    return datasets


@dataclass(frozen=True)
class HubImage:
    """One row's image, read when the engine decodes it; `str()` is the name rows and reports give it."""

    table: object
    column: str
    index: int
    name: str

    def __str__(self) -> str:
        return self.name

    @property
    def key(self) -> str:
        """Changes when the data does: the dataset's fingerprint and the row (the feature cache's key)."""
        return sha1(str(getattr(self.table, "_fingerprint", self.name)), self.name, str(self.index))

    def open(self) -> Image.Image:
        value = self.table[self.index][self.column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            import io

            return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        raise ValueError(f"{self.name}: the '{self.column}' column holds {type(value).__name__}, not an image")


@dataclass
class HubDataset:
    """An opened dataset split: `len()` rows, `image(i)` and `label(i)`, `classes` from its ClassLabel."""

    spec: str
    split: str
    table: object
    image_column: str
    label_column: str | None
    classes: list[str] | None

    @property
    def name(self) -> str:
        """The dataset's short name (its last path part): the templates and description files go by it."""
        base = self.spec.rstrip("/").rsplit("/", 1)[-1]
        return base.lower().replace("-", "_")

    def __len__(self) -> int:
        return len(self.table)

    def image(self, i: int) -> HubImage:
        return HubImage(self.table, self.image_column, i, f"{PREFIX}{self.spec}:{self.split}#{i}")

    def label(self, i: int) -> int:
        return int(self.table[i][self.label_column])

    def labels(self) -> list[int]:
        if self.label_column is None:
            raise ProtextError(f"{PREFIX}{self.spec}: no label column (a ClassLabel feature) to evaluate against")
        return [int(v) for v in self.table[self.label_column]]



def open_dataset(spec: str, split: str | None = None) -> HubDataset:
    """`hf:OWNER/NAME[:SPLIT]` or `hf:PATH[:SPLIT]` (a `save_to_disk` folder or an image folder)."""
    datasets = _module()
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    name, _, given = body.partition(":") if not Path(body).exists() else (body, "", "")
    split = given or split
    path = Path(name).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            loaded = datasets.load_dataset(name)
    except ProtextError:
        raise
    except Exception as e:  # offline, unknown id, no such folder: many classes, one meaning
        raise ProtextError(f"--dataset {spec}: could not load it ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                           f"Offline? Load it where there is internet and save it with "
                           f"datasets' save_to_disk, then give --dataset hf:FOLDER") from e
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = split or next((s for s in ("test", "validation", "train") if s in loaded), splits[0])
        if chosen not in loaded:
            raise ProtextError(f"--dataset {spec}: no split {chosen!r}; it has {', '.join(splits)}")
        table, split = loaded[chosen], chosen
    else:
        table, split = loaded, split or "train"
    features = table.features
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if not images:
        raise ProtextError(f"--dataset {spec}: no image column (an Image feature); its columns: {', '.join(features)}")
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    classes = list(features[labels[0]].names) if labels else None
    return HubDataset(name, split, table, images[0], labels[0] if labels else None, classes)

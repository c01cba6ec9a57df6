"""Class descriptions: `{class name: [sentence, ...]}` JSON files, checked and normalised.

Class names are matched after normalising (Unicode NFC, lower case, `_` as space, single
spaces), because description files and dataset split files spell the same class differently
("Abyssinian", "abyssinian", "annual_crop", "café" composed or as "e" + accent as macOS file
names have it). Every problem is reported with the file and the key.

Files are UTF-8, with or without a byte-order mark (Windows editors write one).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import AbstractSet as Set
from typing import Iterable, Mapping, Sequence

from .errors import ProtextError


def normalize_name(name: str) -> str:
    return " ".join(unicodedata.normalize("NFC", name).replace("_", " ").split()).lower()


def read_text(path: Path, what: str) -> str:
    """A UTF-8 file's text without its byte-order mark, or a ProtextError saying what is wrong."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise ProtextError(f"{path}: no such {what}") from e
    except IsADirectoryError as e:
        raise ProtextError(f"{path}: is a folder, not a {what}") from e
    except UnicodeDecodeError as e:
        raise ProtextError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise ProtextError(f"{path}: cannot read the {what} ({e.strerror})") from e


def read_json(path: str | Path, what: str) -> object:
    """Decode a JSON file, rejecting a key repeated within one object.

    `json.loads` would keep the last of two equal keys and silently drop the first one's list.
    """
    path = Path(path)
    text = read_text(path, what)

    def unique_keys(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in items:
            if key in out:
                raise ProtextError(f"{path}: key {key!r} appears twice{_line_of_repeat(text, key)}; "
                                   f"JSON keeps only the last, so merge the two")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise ProtextError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def _line_of_repeat(text: str, key: str) -> str:
    """The " (line N)" of the key's second occurrence as written: the decoder does not tell the hook
    where it is. Empty when the file spells the key with escapes this search does not match."""
    starts = [m.start() for m in re.finditer(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:", text)]
    if len(starts) < 2:
        return ""
    line = text.count("\n", 0, starts[1]) + 1
    return f" (line {line})"


def parse_descriptions(raw: object, where: str, item: str = "description",
                       skip: Set[str] = frozenset(), keep_blank: bool = False) -> dict[str, list[str]]:
    """Validate a decoded JSON object; returns normalised names -> stripped sentences.

    `item` names what the lists hold in messages ("description", or "descriptor" for DCLIP
    files); keys in `skip` are left out unchecked. Blank sentences are dropped, or with
    `keep_blank` kept as "" in their place (AWT takes a class's first 50 entries, blanks included)."""
    if not isinstance(raw, Mapping):
        raise ProtextError(f"{where}: expected a JSON object {{class name: [{item}s]}}, got {type(raw).__name__}")
    out: dict[str, list[str]] = {}
    original: dict[str, str] = {}
    for key, sentences in raw.items():
        if key in skip:
            continue
        name = normalize_name(str(key))
        if not name:
            raise ProtextError(f"{where}: empty class name {key!r}")
        if name in out:
            raise ProtextError(f"{where}: keys {original[name]!r} and {key!r} are the same class after normalisation ({name!r})")
        if not isinstance(sentences, list):
            raise ProtextError(f"{where}: key {key!r}: expected a list of {item}s, got {type(sentences).__name__}")
        if not sentences:
            raise ProtextError(f"{where}: key {key!r}: empty list of {item}s")
        clean = []
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise ProtextError(f"{where}: key {key!r}, item {i}: expected a string, got {type(s).__name__}")
            if s.strip() or keep_blank:
                clean.append(s.strip())
        if not any(clean):
            raise ProtextError(f"{where}: key {key!r}: every {item} is blank")
        out[name] = clean
        original[name] = str(key)
    if not out:
        raise ProtextError(f"{where}: no classes")
    return out


def load_descriptions(path: str | Path, classes: Sequence[str] | None = None, item: str = "description",
                      skip: Set[str] = frozenset(), keep_blank: bool = False) -> dict[str, list[str]]:
    """Read a description file; with `classes`, keep those (in that order) and fail on any missing."""
    data = parse_descriptions(read_json(path, f"{item} file"), str(path), item, skip, keep_blank)
    return select_classes(data, classes, str(path)) if classes is not None else data


def select_classes(data: Mapping[str, list[str]], classes: Sequence[str], where: str,
                   item: str = "description") -> dict[str, list[str]]:
    names = [normalize_name(c) for c in classes]
    missing = [c for c, n in zip(classes, names) if n not in data]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ProtextError(f"{where}: no {item}s for {len(missing)} requested classes: {shown}{more}")
    return {n: list(data[n]) for n in names}


_CLASS_FILE_ENDINGS = (".txt", ".json", ".csv", ".tsv")


def _looks_like_file(spec: str) -> bool:
    """A --classes value meant as a file: a folder separator or a list-file ending, and no comma."""
    return "," not in spec and ("/" in spec or "\\" in spec or spec.strip().lower().endswith(_CLASS_FILE_ENDINGS))


def read_class_list(spec: str) -> list[str]:
    """Classes from a file (one per line, or a JSON list) or a comma-separated string.

    A value that looks like a file but is none is an error rather than one class name, so a
    mistyped `--classes ../classes.tx` cannot label every image "../classes.tx".
    """
    path, file_like = Path(spec), _looks_like_file(spec)
    if path.is_file() or (file_like and path.exists()):
        names = _class_file(path)  # a folder fails here with a clear message
    elif file_like:
        raise ProtextError(f"{spec}: no such class file; if it is a class name, end it with a comma: {spec + ','!r}")
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ProtextError(f"no class names in {spec!r}")
    return names


def _class_file(path: Path) -> list[str]:
    if path.suffix.lower() != ".json":
        return [line.strip() for line in read_text(path, "class file").splitlines() if line.strip()]
    names = read_json(path, "class file")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtextError(f"{path}: expected a JSON list of class names")
    blank = [i for i, n in enumerate(names, 1) if not n.strip()]
    if blank:
        raise ProtextError(f"{path}: item {blank[0]} of the list is a blank class name")
    return [n.strip() for n in names]


def load_differential(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """Differential descriptions (`describe --differential`): `{class: {other class: [caption, ...]}}`,
    checked, with the file and the keys named in every error."""
    raw = read_json(path, "differential description file")
    if not isinstance(raw, Mapping) or not raw:
        raise ProtextError(f"{path}: expected a JSON object {{class: {{other class: [captions]}}}}")
    out: dict[str, dict[str, list[str]]] = {}
    for a, others in raw.items():
        if not isinstance(others, Mapping):
            raise ProtextError(f"{path}: key {a!r}: expected an object {{other class: [captions]}}")
        for b, captions in others.items():
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip()
                                                                          for c in captions):
                raise ProtextError(f"{path}: {a!r} / {b!r}: expected a list of captions (non-empty strings)")
            out.setdefault(normalize_name(a), {})[normalize_name(b)] = [c.strip() for c in captions]
    return out


def pairs(data: Mapping[str, Iterable[str]]) -> tuple[list[str], list[str], list[int], list[int]]:
    """One training pair per description: (class index, description index) over unique texts."""
    classes = list(data)
    texts: dict[str, int] = {}
    cls_idx, txt_idx = [], []
    for c, sentences in enumerate(data.values()):
        for s in sentences:
            cls_idx.append(c)
            txt_idx.append(texts.setdefault(s, len(texts)))
    return classes, list(texts), cls_idx, txt_idx


def stats(data: Mapping[str, Sequence[str]], classes: Sequence[str] | None = None) -> dict:
    """Counts a person checks before training: sizes, duplicates, lengths, coverage of a label set."""
    counts = [len(v) for v in data.values()]
    words = sorted(len(s.split()) for v in data.values() for s in v)
    within = sum(len(v) - len({s.lower() for s in v}) for v in data.values())
    owners: dict[str, set[str]] = {}
    for name, sentences in data.items():
        for s in sentences:
            owners.setdefault(s.lower(), set()).add(name)
    shared = sum(1 for o in owners.values() if len(o) > 1)

    def pct(q: float) -> int:
        return words[min(len(words) - 1, int(q * len(words)))]

    out = {"classes": len(data), "sentences": sum(counts),
           "per_class": {"min": min(counts), "mean": round(sum(counts) / len(counts), 2), "max": max(counts)},
           "fewest": sorted(data, key=lambda k: len(data[k]))[:5],
           "duplicates_within_class": within, "sentences_shared_by_classes": shared,
           "words_per_sentence": {"p5": pct(0.05), "median": pct(0.5), "p95": pct(0.95), "max": words[-1]}}
    if classes is not None:
        wanted = {normalize_name(c): c for c in classes}
        out["label_set"] = {"size": len(wanted), "missing": [c for n, c in wanted.items() if n not in data],
                            "extra": [n for n in data if n not in wanted]}
    return out

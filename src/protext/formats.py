"""Bring description sets from other formats into protext's `{class: [sentence, ...]}` form.

- `cupl`: the CuPL/ProText JSON format itself (checked and normalised);
- `dclip`: descriptor files `{class: ["has four legs", "usually brown", ...]}`, turned into
  sentences "A {class}, which has four legs.";
- `text`: a folder with one `<class name>.txt` file per class, one sentence per line.
"""

from __future__ import annotations

import re
from pathlib import Path

from .descriptions import load_descriptions, parse_descriptions, read_json, read_text
from .errors import ProtextError

FORMATS = ("cupl", "dclip", "text")
_VERB_START = re.compile(r"^(is|are|has|have|had|can|may|might|will|was|were|does|do|usually|often|typically|"
                         r"sometimes|generally|tends|looks|appears|with)\b", re.IGNORECASE)


def descriptor_sentence(name: str, descriptor: str) -> str:
    """ "A {name}, which has {descriptor}." ("which {descriptor}." when it starts with a verb)."""
    d = re.sub(r"^(which|that)\s+", "", descriptor.strip().rstrip("."), flags=re.IGNORECASE)
    verb = "" if _VERB_START.match(d) else "has "
    article = "An" if name[:1].lower() in "aeiou" else "A"
    return f"{article} {name}, which {verb}{d}."


def from_dclip(path: Path) -> dict[str, list[str]]:
    raw = read_json(path, "DCLIP descriptor file")
    checked = parse_descriptions(raw, str(path))  # same checks: object, lists of strings
    return {name: [descriptor_sentence(name, d) for d in items] for name, items in checked.items()}


def from_text_folder(folder: Path) -> dict[str, list[str]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ProtextError(f"{folder}: expected a folder of <class name>.txt files")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ProtextError(f"{folder}: no .txt files (one per class, one sentence per line)")
    raw = {f.stem: [line for line in read_text(f, "description file").splitlines() if line.strip()] for f in files}
    return parse_descriptions(raw, str(folder))


def import_descriptions(source: str | Path, fmt: str) -> dict[str, list[str]]:
    if fmt == "cupl":
        return load_descriptions(source)
    if fmt == "dclip":
        return from_dclip(Path(source))
    if fmt == "text":
        return from_text_folder(Path(source))
    raise ProtextError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")

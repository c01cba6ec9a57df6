"""Command-line flags made from dataclasses, so a setting is declared once.

Each field of a settings dataclass (`TrainConfig`, `ClassifierOptions`, `Limits`, `Context`, the
protocol settings) carries its help in `metadata["help"]` and, where it has them, its `choices`;
its type and default make the rest of the flag. `add_flags` adds one flag per field,
`from_flags` builds the dataclass back from the parsed arguments.

- `x: int = 3` gives `--x N` (int); `x: str | None = None` gives `--x VALUE`, None when absent;
- `x: bool = False` gives `--x`; `x: bool = True` gives `--no-x`;
- `x: Path | None` gives a path.

Nothing here imports torch: building the parser must stay fast (`protext --help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable

_TYPES = {int: int, float: float, str: str, Path: Path}


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field whose help (and `choices`, `metavar`) become its flag's."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(hint: Any) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a field's type hint."""
    args = typing.get_args(hint)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              only: Iterable[str] | None = None, skip: Iterable[str] = (), help: dict[str, str] | None = None,
              defaults_unset: bool = False, show_default: bool = True) -> None:
    """One flag per field of `cls` (or of `only`, in that order). `help` replaces some fields' help;
    with `defaults_unset` every flag defaults to None, so that only flags given on the command line
    override lower layers (a preset, a config file)."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(only) if only is not None else [f.name for f in dataclasses.fields(cls)]
    for name in names:
        if name in skip:
            continue
        f = by_name[name]
        kind, nullable = _kind(hints[name])
        text = (help or {}).get(name, f.metadata.get("help", ""))
        default = None if defaults_unset else f.default
        if kind is bool:
            if f.default is True:
                parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                    default=None if defaults_unset else True, help=f"no {text}" if text else None)
            else:
                parser.add_argument(flag_name(name), dest=name, action="store_true",
                                    default=None if defaults_unset else False, help=text or None)
            continue
        if kind not in _TYPES:
            raise TypeError(f"{cls.__name__}.{name}: no flag for type {kind}")
        if show_default and not defaults_unset and f.default is not None and "%(default)" not in text:
            text += " (default: %(default)s)"
        elif defaults_unset and f.default is not dataclasses.MISSING:
            text += f" (default: {f.default!r} or the preset's)"
        parser.add_argument(flag_name(name), dest=name, type=_TYPES[kind], default=default,
                            choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                            help=text.replace("%", "%%").replace("%%(default)s", "%(default)s") or None)


def values(cls: type, args: argparse.Namespace, only: Iterable[str] | None = None) -> dict[str, Any]:
    """The fields of `cls` that `args` holds (those `add_flags` added), by name."""
    names = list(only) if only is not None else [f.name for f in dataclasses.fields(cls)]
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def from_flags(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """`cls` built from the parsed flags of its fields (fields without a flag keep their default)."""
    return cls(**{**values(cls, args), **extra})

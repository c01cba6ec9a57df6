"""Results as flat rows, and the one pivot every table, CSV file and chart is made from.

A row is one number: `{"protocol", "dataset", "split", "head", "metric", "value", "source",
"backbone", "prompts"}`, as CLIP_benchmark writes them: `split` is `test`, `base` or `novel`
(and `all` for the base/novel harmonic mean), `metric` is `top1` or `hm`, `source` is
`measured` or `paper` (the published figure, for the table beside it), `prompts` the SHA-256 of
the prompt file the protext head used. Any tool reads them (`pandas.DataFrame(rows)`); the
`.csv` file holds the same rows.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..cache import atomic_write_bytes

COLUMNS = ("protocol", "dataset", "split", "head", "metric", "value", "source", "backbone", "prompts")


def row(protocol: str, dataset: str, split: str, head: str, metric: str, value: float, source: str = "measured",
        backbone: str | None = None, prompts: str | None = None) -> dict:
    return {"protocol": protocol, "dataset": dataset, "split": split, "head": head, "metric": metric,
            "value": value, "source": source, "backbone": backbone, "prompts": prompts}


def value(rows: Iterable[dict], **match) -> float | None:
    """The value of the one row matching `match` (measured unless `source` says), else None."""
    match.setdefault("source", "measured")
    found = [r["value"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def pivot(rows: Sequence[dict], index: str, columns: Sequence[str], cell: Callable[[list[dict]], str],
          column_key: str = "head") -> list[list[str]]:
    """A table: one line per distinct `index` value (in order of appearance), one cell per entry of
    `columns` (values of `column_key`), each made by `cell` from the rows that fall in it."""
    keys = list(dict.fromkeys(r[index] for r in rows))
    return [[k, *[cell([r for r in rows if r[index] == k and r[column_key] == c]) for c in columns]] for k in keys]


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + \
           ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]


def number(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def to_csv(rows: Sequence[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def chart(rows: Sequence[dict], heads: Sequence[str], path: Path, title: str, ylabel: str,
          pick: Callable[[list[dict]], float | None]) -> Path | None:
    """A bar chart, one group per dataset and one bar per head (`pick` of its rows), written
    atomically; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [line for line in pivot(rows, "dataset", heads, lambda rs: pick(rs))
             if all(v is not None for v in line[1:])]
    if not table or not heads:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table) + 2), 4))
    width = 0.8 / len(heads)
    for k, h in enumerate(heads):
        ax.bar([i + k * width for i in range(len(table))], [line[1 + k] for line in table], width, label=h)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], [line[0] for line in table], rotation=30,
                  ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path

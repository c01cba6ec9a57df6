"""The documentation is checked: it builds with --strict, every `protext ...` command line in it
parses with the real argument parser, and the heads table is the heads registry."""

import re
import shlex
import subprocess
import sys

import pytest
from support import ROOT

from protext.cli import build_parser
from protext.heads import HEADS

PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]


def command_lines(text: str) -> list[str]:
    """`protext ...` lines of the fenced shell blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("protext "):
                    lines.append(part.strip())
    return lines


def as_arguments(line: str) -> list[str]:
    """The arguments of a command line, with the pages' notation for choices read as one example:
    `[--x V]` is `--x V`, `A|B` is A, `...`/`…` and `<placeholders>` are dropped."""
    words = []
    for word in shlex.split(line.replace("[", " ").replace("]", " "))[1:]:
        if word in ("...", "…") or word.startswith("<"):
            continue
        words.append(word.split("|")[0] if "|" in word and not word.startswith("http") else word)
    return words


def all_lines() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), line) for page in PAGES for line in command_lines(page.read_text())]


def test_the_pages_hold_command_lines_of_every_command():
    seen = {as_arguments(line)[0] for _, line in all_lines()}
    assert seen >= {"train", "eval-text", "describe", "descriptions", "predict", "eval", "benchmark", "serve",
                    "label", "features", "export"}


@pytest.mark.parametrize("page, line", all_lines())
def test_every_command_line_in_the_docs_parses(page, line):
    parser = build_parser("*")
    try:
        parser.parse_args(as_arguments(line))
    except SystemExit as e:
        pytest.fail(f"{page}: {line!r} does not parse (exit {e.code})")


def test_a_renamed_flag_would_be_caught():
    with pytest.raises(SystemExit):
        build_parser("*").parse_args(as_arguments("protext label photos/ --classes a,b --output x.jsonl --chunk 4"))


def test_the_heads_table_is_the_heads_registry():
    text = (ROOT / "docs" / "heads.md").read_text()
    table = text.split("<!-- heads-table -->", 1)[1].split("<!-- /heads-table -->", 1)[0]
    rows = [line.split(" | ") for line in table.strip().splitlines()[2:]]
    assert [r[0].strip("| `") for r in rows] == list(HEADS)
    for row, head in zip(rows, HEADS.values()):
        assert row[-1].strip(" |`") == (head.given_by.split(",")[0] if head.needs else "–"), head.name


def test_the_site_builds_with_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "commands" / "label" / "index.html").read_text()
    assert "--part-size" in page and "--activation" in page  # the command's help, from the parser

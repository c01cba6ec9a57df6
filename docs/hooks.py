"""MkDocs hook: `<!-- help: COMMAND -->` in a page becomes that command's `--help`, from the real parser,
so a command's reference page cannot drift from its flags."""

import argparse
import os
import re


def _help(command: str) -> str:
    from protext.cli import build_parser

    os.environ["COLUMNS"] = "100"
    parser = build_parser(command.split()[0])
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = action.choices[command.split()[0]]
    for word in command.split()[1:]:  # a sub-command of a command: "descriptions fetch"
        inner = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        sub = inner.choices[word]
    return sub.format_help()


def on_page_markdown(markdown: str, **kwargs) -> str:
    return re.sub(r"<!-- help: ([a-z -]+?) -->", lambda m: f"```text\n{_help(m.group(1))}```", markdown)

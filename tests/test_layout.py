"""The import rules ARCHITECTURE.md states, checked on the source and at run time."""

import ast
import subprocess
import sys

from support import ROOT

PACKAGE = ROOT / "src" / "protext"
INFERENCE = ["classifier", "heads", "baselines", "feature_cache", "model", "backbone", "text_encoder", "images",
             "metrics", "serve", "api", "label", "distributed", "export", "feature_folder", "engine", "parts"]


def imports() -> dict[str, set[str]]:
    """Module -> the protext modules it imports (relative imports, at any depth in the file), dotted from the package."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(rel.parts)
        here = rel.parts[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = here[: len(here) - (node.level - 1)]
                if node.module:
                    found.add(".".join((*base, node.module)))
                else:
                    found |= {".".join((*base, a.name)) for a in node.names}
        graph[name] = found
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_inference_never_imports_training_in_the_source():
    graph = imports()
    for module in INFERENCE:
        bad = {m for m in reachable(graph, module) if m.startswith("training") or m == "cli"}
        assert not bad, (module, bad)


def test_inference_modules_load_no_training_module_in_a_fresh_interpreter():
    """What the source check cannot see: a package __init__ or a lazy import pulling training in."""
    code = ("import importlib, sys\n"
            f"for name in {INFERENCE!r}:\n"
            "    importlib.import_module('protext.' + name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('protext.training') or m == 'protext.cli'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_imports_no_torch():
    """`protext --help` lists the commands without loading torch (it answers in well under a second)."""
    code = "import sys\nfrom protext.cli import build_parser\nbuild_parser(None).format_help()\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_import_cycles_and_cli_is_on_top():
    graph = imports()
    for module in graph:
        assert module not in reachable(graph, module), f"{module} imports itself through {reachable(graph, module)}"
    assert all("cli" not in deps for name, deps in graph.items() if name not in ("__main__",))

"""The import rules ARCHITECTURE.md states, checked on the source."""

import ast

from support import ROOT

PACKAGE = ROOT / "src" / "protext"
INFERENCE = {"classifier", "heads", "baselines", "features", "model", "backbone", "text_encoder", "images", "metrics",
             "serve", "api", "label", "distributed", "export", "feature_folder"}
TRAINING = {"train", "benchmark", "text_eval", "describe", "cli"}


def imports() -> dict[str, set[str]]:
    """Module -> the protext modules it imports (relative imports, at any depth in the file)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = found
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_inference_never_imports_training():
    graph = imports()
    for module in INFERENCE:
        assert not reachable(graph, module) & TRAINING, (module, reachable(graph, module) & TRAINING)


def test_no_import_cycles_and_cli_is_on_top():
    graph = imports()
    for module in graph:
        assert module not in reachable(graph, module), f"{module} imports itself through {reachable(graph, module)}"
    assert all("cli" not in deps for name, deps in graph.items() if name not in ("__main__",))

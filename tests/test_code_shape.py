"""The package's shape: modules import each other without cycles, and functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from labelflow.manifest import _labelflow_imports

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "labelflow"
MAX_FUNCTION_LINES = 60
# A function may be longer when it says why in a comment line starting with this.
LONG_REASON = "# long because"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """labelflow modules imported anywhere in the file, function-local imports included."""
    return _labelflow_imports(ast.parse(path.read_text(encoding="utf-8")))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} - {"labelflow"} for name, path in modules.items()}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a real edge the check must see: experiment imports training (so a cycle through it would show)
    assert "labelflow.training" in graph["labelflow.experiment"]


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the function's docstring: documentation does not make a function long."""
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def test_functions_are_short_or_say_why():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                if length > MAX_FUNCTION_LINES and LONG_REASON not in body:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 60 lines (docstring aside) without a '# long because' comment:\n" + "\n".join(long)


def test_parsing_the_workflow_imports_no_torch():
    """What the rule files import at the top runs on every `snakemake` call (a dry run, each
    cluster job's start): it stays free of torch, torchvision and scikit-learn (seconds each)."""
    import re
    import subprocess
    import sys

    rules = PACKAGE.parents[1] / "workflow" / "rules"
    modules = sorted({m for smk in rules.glob("*.smk") for m in re.findall(r"^from (labelflow[\w.]*) import", smk.read_text(), re.M)})
    assert "labelflow.runs" in modules
    heavy = ("torch", "torchvision", "sklearn")
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"the rule files' imports {modules} load {loaded}"

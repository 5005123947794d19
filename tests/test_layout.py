"""The package's shape (issue 21): the core (pipeline/) never imports the recipes, has no
import circle (lazy imports inside functions count: they were how circles were hidden), and
no function longer than 80 lines."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module, modules=()) -> set[str]:
    """Every module an import statement anywhere in ``tree`` names: ``from a import b`` is a.b
    when that is one of ``modules`` (a submodule), else a."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                names.add(sub if sub in modules else node.module)
    return names


def test_the_core_never_imports_the_recipes():
    offenders = {m: sorted(n for n in _imports(t) if n.split(".")[0] == "recipes") for m, t in _modules().items()}
    assert not {m: n for m, n in offenders.items() if n}


def test_no_import_circle_in_the_core():
    mods = _modules()
    graph = defaultdict(set)
    for m, tree in mods.items():
        for name in _imports(tree, mods):
            while name and name not in mods:  # a.b.c (a function, a class) -> the module that holds it
                name = name.rpartition(".")[0]
            # a submodule importing from its own package: Python loads the package first anyway
            if name and name != m and not m.startswith(name + "."):
                graph[m].add(name)
    # A circle is a module that reaches itself.
    circles = []
    for start in mods:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == start:
                circles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo += graph[m]
    assert not circles, sorted(circles)


def test_no_core_function_over_80_lines():
    long = [(m, n.name, n.end_lineno - n.lineno + 1) for m, tree in _modules().items() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long

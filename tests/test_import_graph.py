"""The import graph: no module imports itself through others, and no two of the folders import each other.

Read from the source (every `import` and `from ... import`, lazy ones inside functions included), so a knot
hidden behind a function-level import is a knot too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"jobs": "promptmill.jobs", "models": "promptmill.models", "pipelines": "promptmill.pipelines"}
FOLDERS = ["promptmill.models.shapes", "promptmill.pipelines.batch", "promptmill.pipelines.runs", "promptmill.pipelines.ops",
           "promptmill.pipelines.training", "promptmill.models"]  # most specific first


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import name` counts `pkg.name` where that is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def _folder(module: str) -> str | None:
    return next((f for f in FOLDERS if module == f or module.startswith(f + ".")), None)


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph()) == []


def test_no_two_folders_import_each_other():
    arrows: dict[tuple[str, str], list[str]] = {}
    for a, deps in import_graph().items():
        for b in deps:
            fa, fb = _folder(a), _folder(b)
            if fa and fb and fa != fb:
                arrows.setdefault((fa, fb), []).append(f"{a} -> {b}")
    both = {k: v for k, v in arrows.items() if (k[1], k[0]) in arrows}
    assert both == {}


@pytest.mark.parametrize("graph, knotted", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_check_finds_a_knot(graph, knotted):
    assert cycles(graph) == knotted

"""The package's import graph: no cycle among its modules, no import of another package's private names.

Built from the source (``ast``), so function-level imports count as much as top-level ones: a cycle
hidden in a function is still a cycle the next refactor trips over.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "diffsynth_templates"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's ``__init__``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _package_of(name: str, modules) -> str:
    return name if modules[name][1] else name.rpartition(".")[0]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """``(edges, private)``: each module's imported package modules, and every ``from X import _name``
    where ``X`` lies in another package than the importer (a subpackage counts as inside)."""
    modules = _modules()
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for name, (path, _) in modules.items():
        here = _package_of(name, modules)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:  # relative: resolved against the importer's package
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith(PACKAGE):
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # a submodule
                    targets.add(f"{source}.{alias.name}")
                    continue
                if source not in modules:
                    continue
                targets.add(source)
                owner = _package_of(source, modules)
                inside = here == owner or here.startswith(owner + ".")
                if alias.name.startswith("_") and not alias.name.startswith("__") and not inside:
                    private.append(f"{name} imports {source}.{alias.name}")
        targets.discard(name)
        edges[name] = targets
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_graph_sees_relative_and_function_level_imports():
    edges, _ = import_graph()
    assert "diffsynth_templates.pipelines.families" in edges["diffsynth_templates.pipelines.auto"]
    # ``from .families.flux2 import ...`` resolves to the submodule
    assert (
        "diffsynth_templates.pipelines.families.flux2"
        in edges["diffsynth_templates.pipelines.flux2_pipeline"]
    )


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_no_private_import_across_packages():
    _, private = import_graph()
    assert private == []

"""The modules of the package import each other without a cycle.

The graph is read from the source with ``ast``: the imports a module runs when it is imported,
that is at module level (in class bodies, ``try`` and ``if`` blocks too), but not those inside
functions nor under ``if TYPE_CHECKING:``. Importing ``a.b.c`` runs the ``__init__`` of ``a.b``
first, so an import also depends on the packages above its target — except those above the
importing module itself, which are always being imported already.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import aioasync_tasks

PACKAGE = Path(aioasync_tasks.__file__).resolve().parent
NAME = aioasync_tasks.__name__


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = [NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def run_at_import(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among ``statements`` that run when the module is imported."""
    for statement in statements:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            yield statement
        elif isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(statement, ast.If) and _is_type_checking(statement.test):
            yield from run_at_import(statement.orelse)
        else:
            for field in ("body", "orelse", "finalbody"):
                yield from run_at_import(getattr(statement, field, []))
            for clause in [*getattr(statement, "handlers", []), *getattr(statement, "cases", [])]:
                yield from run_at_import(clause.body)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def imported(
    module: str, is_package: bool, statement: ast.Import | ast.ImportFrom, modules: set[str]
) -> set[str]:
    """What ``statement`` in ``module`` imports: ``from base import name`` imports the
    submodule ``base.name`` when there is one, else a name that ``base`` defines."""
    if isinstance(statement, ast.Import):
        return {alias.name for alias in statement.names}
    if statement.level == 0:
        base = statement.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - statement.level + (1 if is_package else 0)
        base = ".".join([*parts[:keep], *([statement.module] if statement.module else [])])
    submodules = {f"{base}.{alias.name}" for alias in statement.names}
    return (submodules & modules) | ({base} if submodules - modules else set())


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of the package that must be imported (or be importing) first."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        own = set(_ancestors(module))
        needs: set[str] = set()
        for statement in run_at_import(ast.parse(path.read_text(encoding="utf-8")).body):
            for target in imported(module, is_package, statement, set(modules)):
                if target in modules:
                    needs.add(target)
                    needs.update(a for a in _ancestors(target) if a not in own)
        needs.discard(module)
        graph[module] = needs
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, …, a]``) for each strongly connected set of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path from the component's first module back to itself, through the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest cycle through `start`
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_the_package_has_no_import_cycle() -> None:
    cycles = [" -> ".join(cycle) for cycle in find_cycles(import_graph())]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_skips_functions_and_type_checking() -> None:
    source = """
import os
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from . import hidden
else:
    from . import shown_else
try:
    from . import in_try
except ImportError:
    from . import in_handler
class C:
    from . import in_class
def f():
    from . import in_function
"""
    statements = run_at_import(ast.parse(source).body)
    names = [alias.name for statement in statements for alias in statement.names]
    assert names == ["os", "TYPE_CHECKING", "shown_else", "in_try", "in_handler", "in_class"]


def test_the_graph_of_the_package() -> None:
    graph = import_graph()
    assert f"{NAME}._node" in graph[NAME]
    assert f"{NAME}._node" not in graph[f"{NAME}._task"]  # for type checking only
    assert f"{NAME}._errors" in graph[f"{NAME}._backends._sqldriver"]
    assert NAME not in graph[f"{NAME}._backends._sqldriver"]  # above it: imported already


def test_find_cycles_names_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]

"""The package's import graph has no cycle, counting every import a module can execute.

Every module of ``fsdpqdiag`` is parsed with ``ast``; an edge is any ``import`` or
``from ... import`` anywhere in it (module level, inside a function, under ``if``),
relative imports resolved. ``import a.b.c`` and ``from a.b import c`` run ``a``, ``a.b``
and ``a.b.c`` (each package's ``__init__`` on the way, and ``c`` where it is a submodule),
so the importer depends on each of them. A cycle that works today because its edges are
function-local breaks the day one of them moves to the top of its module: this test fails
listing the cycle.

One kind of edge is left out: a module's own packages. ``a/__init__`` has started running
before any ``a.x`` runs, so a package whose ``__init__`` imports its own submodules (``cli``,
``fixes``, ``render``: the ordinary pattern) is not reported; what they take from each other
is that package's own affair. A package ``__init__`` that imports a module outside it,
which imports a submodule of the package back, is not (``import fsdpqdiag.analyses.preflight``
would then start the package's ``__init__``, which finds ``preflight`` half-initialised):
that cycle is counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fsdpqdiag.core import registry

PACKAGE = "fsdpqdiag"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _run_by(name: str, importer: str, known: dict[str, Path]) -> set[str]:
    """The modules importing ``name`` runs: it and each package above it, less the
    importer's own packages (already running before the importer does)."""
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own = {importer.rsplit(".", i)[0] for i in range(1, importer.count(".") + 1)}
    return {m for m in prefixes if m in known and m not in own}


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets |= _run_by(alias.name, module, known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # from . import x / from ..y import z: relative to this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets |= _run_by(source, module, known)
            for alias in node.names:  # from pkg import submodule
                targets |= _run_by(f"{source}.{alias.name}", module, known)
    targets.discard(module)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: _imports(module, path, known) for module, path in known.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the graph's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                components.append(sorted(component))
    return components


def _a_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle inside a component, to name in the failure."""
    members = set(component)
    path = [component[0]]
    seen = {component[0]: 0}
    while True:
        step = sorted(graph[path[-1]] & members)[0]
        if step in seen:
            return path[seen[step] :] + [step]
        seen[step] = len(path)
        path.append(step)


def test_the_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert "fsdpqdiag.core.outcome" in graph["fsdpqdiag.launcher.launch"]
    # `from fsdpqdiag.probes.common import fsdp_api` inside forensics.run(): the module, and
    # the package whose __init__ runs first
    assert {"fsdpqdiag.probes", "fsdpqdiag.probes.common"} <= graph["fsdpqdiag.analyses.forensics"]
    # fixes/__init__ imports its own submodules, which import fixes.base: not an edge back
    assert "fsdpqdiag.fixes.axolotl_int8" in graph["fsdpqdiag.fixes"]
    assert "fsdpqdiag.fixes" not in graph["fsdpqdiag.fixes.axolotl_int8"]


def test_relative_imports_are_resolved(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from . import x\nfrom ..y import z\n\ndef f():\n    from .x import w\n")
    known = dict.fromkeys(["a", "a.b", "a.b.m", "a.b.x", "a.y", "a.y.z"], module)
    assert _imports("a.b.m", module, known) == {"a.b.x", "a.y", "a.y.z"}


def test_no_import_cycle():
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    described = [
        f"{len(c)} modules: {', '.join(c)}\n  e.g. {' -> '.join(_a_cycle(c, graph))}" for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_core_imports_only_the_standard_library():
    graph = import_graph()
    assert graph["fsdpqdiag.core.outcome"] <= {"fsdpqdiag"}
    assert graph["fsdpqdiag.core.registry"] <= {"fsdpqdiag", "fsdpqdiag.core.outcome"}


def test_register_refuses_a_duplicate_name():
    class Task:
        name = "test-imports-duplicate"

    registry.register(Task())
    try:
        with pytest.raises(ValueError, match="already registered"):
            registry.register(Task())
    finally:
        registry.unregister(Task.name)

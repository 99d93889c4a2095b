"""The package's import graph, read statically: no cycles, and nothing of the build side
reachable from the node side.

Every ``import`` and ``from ... import`` counts, at the top of a module or inside a
function (a lazy import is still a dependency: it runs the first time that code does).
For cycles, imports under ``if TYPE_CHECKING:`` count too: they never run, but a module
that needs another's types depends on it, and hiding an import there (or in a function)
breaks no cycle. What the node side reaches leaves them out: only what runs matters there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import snapbuild

PACKAGE = Path(snapbuild.__file__).parent
#: What only a build machine needs; snapbuild.runner (the node) must reach none of it.
BUILD_SIDE = ("steps", "plan", "exec", "recipe", "build", "cli", "image", "remote_cache")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, type_checking: bool = False):
    """Every import node in ``tree``, at any depth; under ``if TYPE_CHECKING:`` only with
    ``type_checking``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if not type_checking and _type_checking_only(node):
            stack.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported(module: str, is_package: bool, tree: ast.AST, known: set[str], type_checking: bool = False) -> set[str]:
    """The package's modules that ``module`` imports (``from . import x`` names module
    ``x`` when there is one, else the package it comes from); those imported under
    ``if TYPE_CHECKING:`` only with ``type_checking``."""
    out: set[str] = set()
    for node in _imports(tree, type_checking):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        for t in targets:
            while t and t not in known:  # `import snapbuild.store.tree` counts as that module
                t = t.rpartition(".")[0]
            if t.startswith("snapbuild") and t != module:
                out.add(t)
    return out


def import_graph(type_checking: bool = False) -> nx.DiGraph:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    g = nx.DiGraph()
    g.add_nodes_from(known)
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for target in imported(name, path.name == "__init__.py", tree, known, type_checking):
            g.add_edge(name, target)
    return g


def cycle_failure(g: nx.DiGraph) -> str | None:
    """What is wrong with ``g``'s cycles, in words (None when it has none): how many, and
    every loop in full (the smallest of each)."""
    cycles = sorted((c for c in nx.strongly_connected_components(g) if len(c) > 1), key=lambda c: (len(c), min(c)))
    if not cycles:
        return None
    loops = []
    for c in cycles:
        loop = nx.find_cycle(g.subgraph(c), source=min(c))
        loops.append(" -> ".join(a for a, _ in loop) + f" -> {loop[0][0]}")
    return f"{len(cycles)} import cycle(s): " + "; ".join(loops)


def _parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a.b/__init__`` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones():
    """The reader itself: an import inside a function is an edge, one under
    TYPE_CHECKING is not, relative imports resolve to modules."""
    src = ("from typing import TYPE_CHECKING\nfrom .. import tools\nfrom ..store import blobs\n"
           "if TYPE_CHECKING:\n    from ..steps import base\n"
           "def f():\n    from ..registry.oci import OciRegistry\n")
    known = {"snapbuild", "snapbuild.tools", "snapbuild.store", "snapbuild.store.blobs", "snapbuild.steps",
             "snapbuild.steps.base", "snapbuild.registry", "snapbuild.registry.oci", "snapbuild.runtime",
             "snapbuild.runtime.x"}
    got = imported("snapbuild.runtime.x", False, ast.parse(src), known)
    assert got == {"snapbuild.tools", "snapbuild.store.blobs", "snapbuild.registry.oci"}
    # counted when cycles are looked for: a type-only import is still a dependency
    got = imported("snapbuild.runtime.x", False, ast.parse(src), known, type_checking=True)
    assert got == {"snapbuild.tools", "snapbuild.store.blobs", "snapbuild.registry.oci", "snapbuild.steps.base"}


def test_a_cycle_through_a_lazy_or_a_type_only_import_is_found():
    """The two shapes that once hid cycles here: one side imports the other inside a
    function, the other imports it back under TYPE_CHECKING (agent api <-> supervisor,
    steps weights <-> weight_sources)."""
    known = {"snapbuild", "snapbuild.a", "snapbuild.b", "snapbuild.c"}
    sources = {"snapbuild.a": "def f():\n    from . import b\n",
               "snapbuild.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n",
               "snapbuild.c": "from . import a\n"}
    g = nx.DiGraph()
    for name, src in sources.items():
        g.add_edges_from((name, t) for t in imported(name, False, ast.parse(src), known, type_checking=True))
    assert cycle_failure(g) == "1 import cycle(s): snapbuild.a -> snapbuild.b -> snapbuild.a"
    g.remove_edge("snapbuild.b", "snapbuild.a")
    assert cycle_failure(g) is None


def test_no_import_cycles():
    """Counting imports inside functions and under TYPE_CHECKING: a cycle is broken by
    moving what both sides need where it belongs, not by hiding an import."""
    failure = cycle_failure(import_graph(type_checking=True))
    if failure:
        pytest.fail(failure + " (move what both need into a module of its own, or the one that should own it)")


def test_the_node_side_reaches_nothing_of_the_build_side():
    g = import_graph()
    build = {m for m in g if any(m == f"snapbuild.{b}" or m.startswith(f"snapbuild.{b}.") for b in BUILD_SIDE)}
    node_side = [m for m in g if m == "snapbuild.runner" or m.startswith("snapbuild.runner.")]
    assert node_side, "no snapbuild.runner modules found"
    # Importing a module runs its packages' __init__ first: they are reached too.
    reach = g.copy()
    reach.add_edges_from((m, p) for m in g for p in _parents(m) if p in g)
    reached = set(node_side).union(*(nx.descendants(reach, m) for m in node_side))
    bad = sorted(reached & build)
    if bad:
        first = bad[0]
        src = next(m for m in node_side if nx.has_path(reach, m, first))
        path = nx.shortest_path(reach, src, first)
        pytest.fail(f"the node side reaches build-side module(s) {', '.join(bad)}; e.g. " + " -> ".join(path))

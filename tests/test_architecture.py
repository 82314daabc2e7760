"""The layers of docs/architecture.md, checked on the source: imports run one way, no circles."""

from __future__ import annotations

import ast
import functools
from collections.abc import Container, Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "spatialid"

# Lower number = lower layer. A module may import its own layer or any lower one.
LAYER = {
    "_version": 0, "_lazy": 0, "defaults": 0, "errors": 0, "utils": 0,
    "models": 1, "masks": 1,
    "encoder": 2, "injection": 2,
    "loaders": 2.5,  # the one PuLID loader: below the pipeline, as diffusers' loaders are
    "pipeline": 3,
    "app": 4,
    "ui": 5, "bench": 5, "evaluation": 5,
    "cli": 6,
    "__init__": 7, "__main__": 7,
}
# Front-ends that may use another front-end's public file format (documented in architecture.md).
ALLOWED_SIDEWAYS = {("evaluation", "bench")}


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.suffix else rel.parts[0]


def _imports(path: Path) -> set[str]:
    """Top-level spatialid packages imported anywhere in ``path`` (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "spatialid" and len(parts) > 1:
                found.add(parts[1])
    return found


@functools.cache  # parsed once for the ~25 tests that read it (the sources do not change during a run)
def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        pkg = _package_of(path)
        edges.setdefault(pkg, set()).update(p for p in _imports(path) if p != pkg)
    return edges


def test_every_package_has_a_layer():
    assert set(_edges()) <= set(LAYER), set(_edges()) - set(LAYER)


@pytest.mark.parametrize("pkg", sorted(LAYER))
def test_imports_run_downward(pkg):
    for target in sorted(_edges().get(pkg, ())):
        if (pkg, target) in ALLOWED_SIDEWAYS:
            continue
        assert LAYER[target] < LAYER[pkg] or (LAYER[target] == LAYER[pkg] and LAYER[pkg] <= 2), (
            f"spatialid.{pkg} imports spatialid.{target} (layer {LAYER[target]} >= {LAYER[pkg]})"
        )


def test_nothing_outside_cli_imports_cli():
    offenders = [
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
        if _package_of(p) not in ("cli", "__main__") and "cli" in _imports(p)
    ]
    assert offenders == []


def test_no_import_circles_between_packages():
    edges = _edges()
    seen: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in edges.get(node, ()):
            assert seen.get(nxt) != 1, "import circle: " + " -> ".join([*stack, node, nxt])
            if nxt not in seen:
                visit(nxt, [*stack, node])
        seen[node] = 2

    for pkg in edges:
        if pkg not in seen:
            visit(pkg, [])


# ----------------------------------------------------------------------------- modules

MAX_LINES = 650  # a source file longer than this does several jobs: split it by job


def _module_name(path: Path) -> str:
    """``spatialid.models.checkpoint`` for models/checkpoint.py, ``spatialid.models`` for its __init__.py."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``: imports for annotations, not run."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` (their ``else:`` runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield stmt
                yield from _runtime_nodes(stmt)
            continue
        yield child
        yield from _runtime_nodes(child)


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, files: Container[str]) -> set[str]:
    """The modules of ``files`` that one import statement in ``module`` imports.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of
    ``pkg`` (its ``__init__``); relative imports are resolved against the importing file's package.
    """

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        return {m for m in (known(a.name) for a in node.names) if m}
    package = module if is_package else module.rpartition(".")[0]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    found = set()
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        hit = sub if sub in files else known(target)
        if hit:
            found.add(hit)
    return found


@functools.cache  # parsed once, like _edges
def _module_edges() -> dict[str, set[str]]:
    """Module -> the spatialid modules it imports when it runs (module level or inside functions).

    The parent packages Python imports on the way are not counted: an ``__init__`` that imports its
    own submodules would otherwise make a circle of every module below it.
    """
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for module, path in files.items():
        found: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= _resolve(module, path.name == "__init__.py", node, files)
        edges[module] = found - {module}
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of 2 or more, Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_module_graph_resolves_relative_and_type_checking_imports():
    """The helpers above on a made-up tree: relative imports, TYPE_CHECKING blocks, imports in functions."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "from .c import X\n"
        "if TYPE_CHECKING:\n    from .d import Y\nelse:\n    import p.e.f\n"
        "def g():\n    from .. import h\n"
    )
    files = {"p", "p.e", "p.e.a", "p.e.b", "p.e.c", "p.e.d", "p.e.f", "p.h"}
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _resolve("p.e.a", False, node, files)
    assert found == {"p.e.b", "p.e.c", "p.e.f", "p.h"}  # not p.e.d: only named for type checkers
    assert _resolve("p.e", True, ast.parse("from . import b").body[0], files) == {"p.e.b"}  # an __init__'s package
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "spatialid.models.configs" in _module_edges()["spatialid.models"]


def test_no_import_circles_between_modules():
    circles = _circles(_module_edges())
    assert not circles, "modules that import each other (at run time): " + "; ".join(
        " <-> ".join(group) for group in circles
    )


def test_no_source_file_is_too_long():
    lengths = {
        str(p.relative_to(SRC)): len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(SRC.rglob("*.py"))
    }
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines (split them by job): " + ", ".join(
        f"{name} ({n})" for name, n in sorted(long.items(), key=lambda kv: -kv[1])
    )

"""The layers of docs/architecture.md, checked on the source: imports run one way, no circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "spatialid"

# Lower number = lower layer. A module may import its own layer or any lower one.
LAYER = {
    "_version": 0, "_lazy": 0, "defaults": 0, "errors": 0, "utils": 0,
    "models": 1, "masks": 1,
    "encoder": 2, "injection": 2,
    "pipeline": 3, "loaders": 3.5,  # loaders/ uses the pipeline package (settings, hub errors)
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

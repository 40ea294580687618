"""The package's layers: each module imports only from its own layer or the ones below.

The tree says where each part lives (docs/development.md, "The module map"); this test
keeps the imports honest to it. Imports anywhere in a module count, lazy ones included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "asgi_worker"

# Lowest first. A module may import its own layer and those below, never one above, and
# never a sibling of the same rank (one backend never imports another).
LAYERS: list[tuple[str, int]] = [
    ("asgi_worker.core", 0),
    ("asgi_worker.backends.base", 1),
    ("asgi_worker.backends.memory", 2),
    ("asgi_worker.backends.redis", 2),
    ("asgi_worker.observability", 3),
    ("asgi_worker.worker", 4),
    ("asgi_worker.web", 5),
    # The tools users call, and the package's own front: anything below.
    ("asgi_worker.testing", 6),
    ("asgi_worker.invalidation", 6),
    ("asgi_worker.client", 6),
    ("asgi_worker.stats", 6),
    ("asgi_worker.store", 6),
    ("asgi_worker.queue", 6),
    ("asgi_worker.backends", 6),  # the subpackage's own __init__ re-exports
    ("asgi_worker.dashboard", 7),  # a tool that uses the tools (the Invalidator)
    ("asgi_worker.cli", 8),
    ("asgi_worker", 9),
]


def layer_of(module: str) -> tuple[str, int]:
    """The layer a dotted module name belongs to: the longest prefix in `LAYERS`."""
    best = ("", -1)
    for prefix, rank in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[0]):
            best = (prefix, rank)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules `path` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package imports absolutely)"
            if node.module and node.module.startswith("asgi_worker"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("asgi_worker"))
    return found


def package_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_imports_only_its_layer_or_below() -> None:
    wrong = []
    for module, imported in package_graph().items():
        own, rank = layer_of(module)
        for name in sorted(imported):
            other, other_rank = layer_of(name)
            if other == own:
                continue
            if other_rank >= rank:
                wrong.append(f"{module} ({own}) imports {name} ({other})")
    assert not wrong, "\n".join(wrong)


def test_the_package_imports_form_no_cycle() -> None:
    graph = package_graph()
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        if module in trail:
            raise AssertionError("import cycle: " + " -> ".join((*trail, module)))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*trail, module))
        done.add(module)

    for module in sorted(graph):
        # A package's __init__ importing its own modules is not a cycle.
        visit(module, ())


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("asgi_worker.core.discovery", "asgi_worker.web.middleware"),
        ("asgi_worker.backends.memory", "asgi_worker.backends.redis.queue"),
        ("asgi_worker.backends.redis.queue", "asgi_worker.worker.job"),
    ],
)
def test_the_check_refuses_an_import_from_above(module: str, imported: str) -> None:
    """The rule itself: these imports (each one the tree once had) are refused."""
    own, rank = layer_of(module)
    other, other_rank = layer_of(imported)
    assert own != other
    assert other_rank >= rank


def test_the_module_map_names_every_module_and_only_modules() -> None:
    """docs/development.md's module map is the one map, and true to the tree."""
    page = (PACKAGE.parent / "docs" / "development.md").read_text()
    section = page.split("## The module map", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            first_cell = row.split("|")[1]
            named.update(re.findall(r"`([\w/]+\.(?:py|js))`", first_cell))
    files = {
        path.relative_to(PACKAGE).as_posix()
        for path in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.js")]
        if path.name != "__init__.py" or path.parent == PACKAGE
    }
    assert not files - named, f"modules missing from the map: {sorted(files - named)}"
    assert not named - files, f"the map names files that do not exist: {sorted(named - files)}"

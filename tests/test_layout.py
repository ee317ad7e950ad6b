"""The house: imports within each package run one way (no circle, lazy imports included), and the
README, the user's document, points nowhere outside the repository."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (relative imports, anywhere in the file;
    a package is its ``__init__``)."""
    modules = {".".join(p.relative_to(package).with_suffix("").parts): p for p in package.rglob("*.py")}

    def resolve(parts: list[str]) -> str:
        name = ".".join(parts)
        return name if name in modules else ".".join([*parts, "__init__"])

    graph = {}
    for module, path in modules.items():
        here = module.split(".")[:-1]  # the package the module is in
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - (node.level - 1)]
                if node.module:
                    deps.add(resolve([*base, *node.module.split(".")]))
                else:  # from . import a, b: modules
                    deps.update(resolve([*base, alias.name]) for alias in node.names)
        graph[module] = {d for d in deps if d != module and d in modules}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                return path[path.index(dep):] + [dep]
            if dep not in done:
                found = visit(dep, path + [dep])
                if found:
                    return found
        done.add(node)
        return []

    for start in sorted(graph):
        found = visit(start, [start])
        if found:
            return found
    return []


@pytest.mark.parametrize("package", ["opsdl", "opsdl_kernels"])
def test_no_import_circle(package):
    graph = _imports(ROOT / package)
    assert len(graph) > 5
    assert _cycle(graph) == []


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_readme_points_nowhere_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    outside = re.findall(r"\.\./[\w./-]+", readme)
    assert outside == []
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        if not re.match(r"[a-z]+://", link):
            assert (ROOT / link).exists(), link

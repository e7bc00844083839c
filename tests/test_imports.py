"""The house rules that keep the package layered: no import cycles between
pipeline's modules, counting imports made inside functions too (a local import
that only dodges a cycle still is one)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


def module_name(path: Path) -> str:
    """pipeline/train.py -> train; pipeline/data/prepare.py -> data.prepare; pipeline/data/__init__.py -> data."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """pipeline module (subpackages' modules dotted) -> the pipeline modules it imports anywhere in its text."""
    paths = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE]
    modules = {module_name(p) for p in paths}
    edges: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path)
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                here = package[:len(package) - (node.level - 1)]
                targets = [node.module] if node.module else [a.name for a in node.names]
                for t in targets:
                    dotted = ".".join(here + t.split("."))
                    # the module itself, or the package it lies in when `t` names something inside a module
                    deps.add(dotted if dotted in modules else dotted.rsplit(".", 1)[0])
        edges[name] = deps & modules - {name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycles_in_pipeline():
    cycle = find_cycle(module_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_bottom_modules_import_nothing_above_them():
    edges = module_imports()
    assert edges["constants"] == set()
    assert edges["formats"] <= {"errors"}
    assert edges["errors"] == set()

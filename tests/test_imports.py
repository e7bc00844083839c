"""The house rules that keep the package layered: no import cycles between
pipeline's modules, counting imports made inside functions too (a local import
that only dodges a cycle still is one)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """pipeline/train.py -> train; pipeline/data/prepare.py -> data.prepare; pipeline/data/__init__.py -> data."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """pipeline module (subpackages' modules dotted) -> the pipeline modules it imports anywhere in its text:
    relative (`from .x import`) and absolute (`from pipeline.x import`, `import pipeline.x`) alike."""
    paths = [p for p in package.rglob("*.py") if p.name != "__init__.py" or p.parent != package]
    modules = {module_name(p, package) for p in paths}
    edges: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path, package)
        here_parts = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        targets: list[str] = []  # dotted names below the package
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = node.module.split(".") if node.module else []
                if node.level:  # from .x import y, from .. import x
                    base = here_parts[:len(here_parts) - (node.level - 1)] + module
                elif module[:1] == [package.name]:  # from pipeline.x import y, from pipeline import x
                    base = module[1:]
                else:
                    continue
                targets += [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.Import):  # import pipeline.x
                targets += [a.name.split(".", 1)[1] for a in node.names if a.name.startswith(package.name + ".")]
        deps: set[str] = set()
        for dotted in targets:
            # a module itself, or the module it lies in when `dotted` names something inside a module
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


def test_absolute_imports_are_edges_too(tmp_path):
    """A package of the same name whose only cycle runs through absolute imports, one of them inside a
    function: module_imports sees every edge, and the cycle is found."""
    package = tmp_path / PACKAGE.name
    (package / "data").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": f"from {PACKAGE.name}.b import f\n",
        "b.py": f"def f():\n    import {PACKAGE.name}.data.c\n",
        "data/__init__.py": "from .c import g\n",
        "data/c.py": f"from {PACKAGE.name} import a\nfrom {PACKAGE.name}.data import d\n",
        "data/d.py": "import os\n",
    }
    for rel, text in files.items():
        (package / rel).write_text(text, encoding="utf-8")
    edges = module_imports(package)
    assert edges == {"a": {"b"}, "b": {"data.c"}, "data": {"data.c"}, "data.c": {"a", "data.d"}, "data.d": set()}
    assert find_cycle(edges) == ["a", "b", "data.c", "a"]


def test_bottom_modules_import_nothing_above_them():
    edges = module_imports()
    assert edges["constants"] == set()
    assert edges["formats"] <= {"errors"}
    assert edges["errors"] == set()

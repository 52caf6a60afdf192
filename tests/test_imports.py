"""fastdiff's modules import one another without a cycle, counting imports inside functions.

A function-level import that closes a cycle is a layering bug with the warning switched
off: it works until someone imports the modules in another order.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastdiff"


def module_names() -> dict[str, Path]:
    """Every module under fastdiff/, by dotted name; a package's __init__ is the package."""
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastdiff modules that running `path` imports, at any depth of the file.

    Importing a.b.c also runs the __init__ of a.b (and of a), so those count too, except
    the packages that hold `name` itself: they are loading it, not loaded by it.
    """
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets.update(f"{source}.{alias.name}" for alias in node.names)
    edges = set()
    for target in targets:
        if target not in modules:
            continue
        for module in [*_ancestors(target), target]:
            if module != name and module not in _ancestors(name):
                edges.add(module)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_module_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "fastdiff"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fastdiff.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "sub" / "b.py").write_text("import fastdiff.a\n")
    modules = {
        "fastdiff": pkg / "__init__.py",
        "fastdiff.a": pkg / "a.py",
        "fastdiff.sub": pkg / "sub" / "__init__.py",
        "fastdiff.sub.b": pkg / "sub" / "b.py",
    }
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert graph["fastdiff.a"] == {"fastdiff.sub", "fastdiff.sub.b"}
    assert graph["fastdiff.sub"] == {"fastdiff.sub.b"}
    assert graph["fastdiff.sub.b"] == {"fastdiff.a"}
    assert find_cycle(graph) == ["fastdiff.a", "fastdiff.sub", "fastdiff.sub.b", "fastdiff.a"]

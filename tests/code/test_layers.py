"""The backend's packages are layers: a module imports only from its own package or a lower layer, and no
module imports itself back through others (docs/ARCHITECTURE.md lists the layers and what each holds)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)

BACKEND = REPO / "vilau_backend"
# bottom to top; a module may import from its own layer or any layer before it
LAYERS = ("errors", "checkpoint", "memory", "media", "model", "decoding", "tasks", "testing", "jobs", "cli", "__main__", "__init__")


def module_name(path: Path) -> str:
    parts = path.relative_to(BACKEND.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str) -> set[str]:
    """The vilau_backend modules `path` imports, at the top or inside functions, as dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vilau_backend"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "vilau_backend":
                target = node.module
            else:
                continue
            # `from pkg import mod` names a module when mod is one
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if module_path(candidate) else target)
    return found


def module_path(name: str) -> Path | None:
    rel = Path(*name.split(".")[1:])
    for path in (BACKEND / rel.with_suffix(".py") if rel.parts else None, BACKEND / rel / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "__init__")


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(BACKEND.rglob("*.py")):
        name = module_name(path)
        graph[name] = {m for m in imported_modules(path, name) if m != name and m != "vilau_backend"}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{importer} imports {imported}" for importer, targets in graph.items()
            for imported in sorted(targets) if layer(imported) > layer(importer)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, found by depth-first search (one path per back edge)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_backend_package_is_a_known_layer():
    packages = {p.name for p in BACKEND.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in BACKEND.glob("*.py")}
    assert packages | modules == set(LAYERS), "add the new package or module to LAYERS (and docs/ARCHITECTURE.md)"


def test_the_checker_sees_upward_relative_and_function_level_imports(tmp_path):
    graph = {"vilau_backend.model.llm": {"vilau_backend.tasks.generate"}, "vilau_backend.tasks.generate": set()}
    assert upward_imports(graph) == ["vilau_backend.model.llm imports vilau_backend.tasks.generate"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    source = BACKEND / "model" / "llm.py"
    # llm.py imports the placement lazily, inside a function, by a two-dot relative import
    assert "vilau_backend.memory.placement" in imported_modules(source, module_name(source))


def test_imports_only_point_downward():
    assert not upward_imports(import_graph())


def test_no_import_cycles():
    assert not cycles(import_graph())

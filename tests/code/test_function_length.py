"""No function in vilau_backend/ or nodes/ is longer than 60 lines (each phase short enough to read at once).

Exempt: a node's `define_schema`, which is a declaration (one entry per input, each with its tooltip).
"""

from __future__ import annotations

import ast

import pytest
from conftest import REPO

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)

LIMIT = 60
CHECKED = ("vilau_backend", "nodes")
EXEMPT = {"define_schema"}


def long_functions(source: str, limit: int = LIMIT) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function over `limit` lines, decorators excluded."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if lines > limit and child.name not in EXEMPT:
                    found.append((name, child.lineno, lines))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source), "")
    return found


def test_checker_finds_long_functions_and_methods_but_not_schemas():
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))  # def line + 60 = 61 lines
    source = f"def long():\n{body}\n\nclass Node:\n    def execute(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n"
    source += f"\n    def define_schema(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n\ndef short():\n    return 1\n"
    assert [(name, lines) for name, _, lines in long_functions(source)] == [("long", 61), ("Node.execute", 61)]


def test_no_function_in_the_backend_or_the_nodes_is_longer_than_60_lines():
    offenders = [
        f"{path.relative_to(REPO)}:{line} {name} ({lines} lines)"
        for folder in CHECKED
        for path in sorted((REPO / folder).rglob("*.py"))
        for name, line, lines in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "functions over 60 lines (split them):\n" + "\n".join(offenders)

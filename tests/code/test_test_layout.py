"""The tests' folders say what they need: tests/comfyui holds exactly the modules marked `comfyui` (a real
ComfyUI, a browser or ComfyUI's installers), which dev/scripts/run_tests.sh leaves out of its transformers
4.50.3 pass with `-m "not comfyui"`; every other folder runs there too."""

from __future__ import annotations

import ast

from conftest import REPO

TESTS = REPO / "tests"
FOLDERS = {"backend", "nodes", "comfyui", "code"}


def marked_comfyui(source: str) -> bool:
    """Whether a test module sets `pytestmark = pytest.mark.comfyui` (alone or in a list)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            marks = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            return any(isinstance(m, ast.Attribute) and m.attr == "comfyui" for m in marks)
    return False


def test_the_marker_reader_sees_the_module_mark():
    assert marked_comfyui("import pytest\npytestmark = pytest.mark.comfyui\n")
    assert marked_comfyui("import pytest\npytestmark = [pytest.mark.slow, pytest.mark.comfyui]\n")
    assert not marked_comfyui("import pytest\n\n@pytest.mark.comfyui\ndef test_x():\n    pass\n")


def test_every_test_module_sits_in_a_layer_folder():
    stray = [str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py")
             if "fixtures" not in p.parts and p.parent.name not in FOLDERS]
    assert not stray, f"put these in one of {sorted(FOLDERS)}: {stray}"


def test_comfyui_folder_holds_exactly_the_comfyui_marked_modules():
    misplaced = [
        str(p.relative_to(TESTS)) for p in sorted(TESTS.rglob("test_*.py"))
        if marked_comfyui(p.read_text(encoding="utf-8")) != (p.parent.name == "comfyui")
    ]
    assert not misplaced, f"marked comfyui outside tests/comfyui, or unmarked inside it: {misplaced}"

"""The templates' example inputs: shipped with the pack, copied into ComfyUI's input folder without
replacing a user's file, and every file a template names is among them."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)

SHIPPED = REPO / "example_inputs"


def example_inputs_module():
    # by file: the nodes package itself imports ComfyUI
    spec = importlib.util.spec_from_file_location("example_inputs", REPO / "nodes" / "example_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_files() -> dict[str, bytes]:
    return {p.relative_to(SHIPPED).as_posix(): p.read_bytes() for p in SHIPPED.rglob("*") if p.is_file()}


def test_install_copies_every_example_into_an_empty_input_folder(tmp_path):
    written = example_inputs_module().install_example_inputs(tmp_path / "input")
    copied = {p.relative_to(tmp_path / "input").as_posix(): p.read_bytes() for p in written}
    assert copied == shipped_files()
    assert "vila-u-caption-example/lighthouse.png" in copied and "vila-u-example.mp4" in copied


def test_install_never_replaces_a_file_already_there(tmp_path):
    mine = tmp_path / "input" / "vila-u-example.png"
    mine.parent.mkdir()
    mine.write_bytes(b"the user's own picture")
    module = example_inputs_module()
    written = module.install_example_inputs(tmp_path / "input")
    assert mine.read_bytes() == b"the user's own picture" and mine not in written
    assert module.install_example_inputs(tmp_path / "input") == []  # a second start copies nothing


def test_an_unusable_input_folder_costs_the_examples_not_the_pack(tmp_path, caplog):
    blocked = tmp_path / "input"
    blocked.write_text("a file where the input folder should be")
    assert example_inputs_module().install_example_inputs(blocked) == []
    assert "could not copy the example input vila-u-example.png" in caplog.text


def test_every_input_file_a_template_names_is_shipped():
    names = set(shipped_files()) | {"vila-u-caption-example"}
    named = set()
    for path in (REPO / "example_workflows").glob("*.json"):
        for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
            if node["type"] in ("LoadImage", "LoadVideo"):
                named.add(node["widgets_values"][0])
            if node["type"] == "VILAU_CaptionFolder":
                named.add(node["widgets_values"][0])
    assert named and named <= names, sorted(named - names)

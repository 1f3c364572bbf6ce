"""A stand-in for ComfyUI's `comfy_api` (and `comfy.utils`), just enough for the node modules to
import and for their `execute` to run up to the backend: the nodes' own logic tested without ComfyUI.
What the nodes build from it (inputs, outputs, progress bars) is `Anything`."""

from __future__ import annotations

import sys
import types

import pytest
from conftest import pack_module


class Anything:
    """Whatever a node module builds from comfy_api at import or run time: any attribute, any call."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __getattr__(self, name):
        return Anything()

    def __call__(self, *args, **kwargs):
        return Anything(*args, **kwargs)

    def __setitem__(self, key, value):
        pass


def pack_backend(name: str):
    """A backend module as the nodes import it: under the pack's package name (`pack_backend("errors")`)."""
    import importlib

    return importlib.import_module(f"vilau_pack.vilau_backend.{name}")


def schema_defaults(node) -> dict:
    """{input id: its default} of a node's define_schema() built from the stand-in."""
    schema = node.define_schema()
    return {i.args[0]: i.kwargs["default"] for i in schema.kwargs["inputs"]
            if isinstance(i, Anything) and i.args and "default" in i.kwargs}


class ComfyNode:
    hidden = types.SimpleNamespace(unique_id="7")


@pytest.fixture
def node_module(monkeypatch):
    """`pack_module` against the stand-in comfy_api and comfy.utils; the node modules imported so are
    forgotten afterwards, so no other test sees them."""
    io = Anything()
    io.ComfyNode = ComfyNode
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=Anything)
    for name, module in (("comfy_api", types.ModuleType("comfy_api")), ("comfy_api.latest", latest),
                         ("comfy", comfy), ("comfy.utils", comfy.utils)):
        monkeypatch.setitem(sys.modules, name, module)
    before = set(sys.modules)
    yield pack_module
    for name in set(sys.modules) - before:
        if name.startswith("vilau_pack.nodes."):
            del sys.modules[name]

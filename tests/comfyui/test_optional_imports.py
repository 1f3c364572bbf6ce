"""The quantization libraries are the pack's imports only when their quantization is chosen.

torchao prints a screen of deprecation warnings when it is imported, and bitsandbytes probes
for CUDA libraries; neither is installed with the pack. Once torchao is installed, transformers
itself imports it at the first model load (its quantizer registry), which the pack cannot stop;
what is checked here is who asks for the import: no module of the pack, when ComfyUI imports
the pack, lists its nodes and a model loads with quantize 'none'.

Each case runs in a fresh Python that records, for every import statement naming torchao or
bitsandbytes (also of a module imported already), the file whose code asked for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dev.comfy_harness import server as cs
from conftest import GOLDEN_CHECKPOINT, REPO

pytestmark = pytest.mark.comfyui  # imports the pack through the pinned ComfyUI's comfy_api

WATCHED = ("torchao", "bitsandbytes")

RECORDER = textwrap.dedent("""
    import asyncio, builtins, importlib.util, json, sys

    importers = []
    real_import = builtins.__import__

    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        # every import statement and __import__ call, also of a module loaded already
        if level == 0 and name.split(".")[0] in {watched}:
            importers.append([name, sys._getframe(1).f_code.co_filename])
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = recording_import
    sys.path.insert(0, {comfyui!r})
    spec = importlib.util.spec_from_file_location("vilau_pack", {init!r}, submodule_search_locations=[{repo!r}])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["vilau_pack"] = pack
    spec.loader.exec_module(pack)
    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    from vilau_pack.vilau_backend.model.vila_u import VilaUModel

    VilaUModel.load({checkpoint!r}, dtype="float32", device="cpu", quantize={quantize!r})
    print(json.dumps({{"nodes": len(nodes), "importers": importers}}))
""")


def importers_when_loading(quantize: str) -> list[tuple[str, str]]:
    script = RECORDER.format(watched=set(WATCHED), comfyui=str(cs.comfyui_dir()), init=str(REPO / "__init__.py"),
                             repo=str(REPO), checkpoint=str(GOLDEN_CHECKPOINT), quantize=quantize)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=REPO.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 13, report
    return [tuple(entry) for entry in report["importers"]]


def pack_files(importers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The imports asked for by the pack's own code (its environment's site-packages excluded)."""
    own = [str(REPO / folder) for folder in ("nodes", "vilau_backend")] + [str(REPO / "__init__.py")]
    return [(name, file) for name, file in importers if file.startswith(tuple(own))]


def test_pack_imports_no_quantization_library_when_quantize_is_none():
    assert pack_files(importers_when_loading("none")) == []


def test_pack_imports_torchao_when_int8_is_chosen():
    # the same recording sees the pack's own import when int8 is chosen: the test above can fail
    asked = pack_files(importers_when_loading("int8"))
    assert ("torchao", str(REPO / "vilau_backend" / "memory" / "weight_quantization.py")) in asked, asked

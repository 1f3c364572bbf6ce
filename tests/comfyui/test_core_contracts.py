"""What the nodes rely on in ComfyUI's own code, checked against the running core (the pinned 0.3.75,
or $COMFYUI_DIR), so that a core which changes it fails here rather than in a user's graph:

- nodes/video_source.py reads a VIDEO's file directly only when `VideoFromFile` takes no argument
  beyond those it knows (its file, a trim, a crop) and the VIDEO's public `get_duration()` and
  `get_dimensions()` equal those of its whole file;
- nodes/schema.py `advanced()` passes `advanced=True` where an input's constructor takes it, and
  otherwise adds the key to `extra_dict`, which the input's definition must then carry.

One fresh Python imports the core's comfy_api and the pack (as tests/comfyui/test_optional_imports.py
does), so that core's modules stay out of this test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from dev.comfy_harness import server as cs

pytestmark = pytest.mark.comfyui  # imports the pinned ComfyUI's comfy_api

VIDEO = REPO / "example_inputs" / "vila-u-example.mp4"  # 3 s of 256 x 256

PROBE = textwrap.dedent("""
    import importlib, importlib.util, inspect, json, sys

    sys.path.insert(0, {comfyui!r})
    spec = importlib.util.spec_from_file_location("vilau_pack", {init!r}, submodule_search_locations=[{repo!r}])
    sys.modules["vilau_pack"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["vilau_pack"])
    video_source = importlib.import_module("vilau_pack.nodes.video_source")
    schema = importlib.import_module("vilau_pack.nodes.schema")
    from comfy_api.latest import InputImpl, Input, io

    File = InputImpl.VideoFromFile
    video = File({video!r})
    trimmed = video.as_trimmed(start_time=1.0) if hasattr(File, "as_trimmed") else None
    cropped = video.as_cropped(0, 0, 128, 128) if hasattr(File, "as_cropped") else None
    knob = schema.advanced(io.Int.Input, "knob", default=1, tooltip="t")
    print(json.dumps({{
        "file_arguments": sorted(inspect.signature(File).parameters),
        "known": sorted(video_source.KNOWN_FILE_ARGUMENTS),
        "public_methods": [m for m in ("get_stream_source", "get_duration", "get_dimensions")
                           if callable(getattr(Input.Video, m, None))],
        "extent": video_source.extent(video),
        "whole": video_source.whole_file_path(video, File),
        "views": [video_source.whole_file_path(v, File) for v in (trimmed, cropped) if v is not None],
        "advanced_in_definition": knob.as_dict().get("advanced"),
    }}))
""")


@pytest.fixture(scope="module")
def probed() -> dict:
    script = PROBE.format(comfyui=str(cs.comfyui_dir()), init=str(REPO / "__init__.py"), repo=str(REPO),
                          video=str(VIDEO))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=REPO.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_video_from_file_holds_only_what_the_whole_file_check_can_see(probed):
    assert set(probed["file_arguments"]) <= set(probed["known"]), (
        f"VideoFromFile takes {probed['file_arguments']}; nodes/video_source.py knows {probed['known']}: "
        "check that get_duration() and get_dimensions() still tell a changed view from its whole file, "
        "then add the new arguments to KNOWN_FILE_ARGUMENTS"
    )
    assert probed["public_methods"] == ["get_stream_source", "get_duration", "get_dimensions"]


def test_an_untouched_video_file_is_read_directly_and_its_views_are_not(probed):
    assert probed["extent"] == [3.0, [256, 256]]
    assert probed["whole"] == str(VIDEO)
    assert probed["views"] == [None] * len(probed["views"])  # a core with lazy trims and crops has views


def test_advanced_inputs_say_so_in_their_definition(probed):
    assert probed["advanced_in_definition"] is True  # by the constructor's argument or by extra_dict

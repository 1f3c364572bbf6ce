"""Proves the real-ComfyUI harness (dev/comfy_harness/server.py) on a throwaway pack.

Starts the pinned ComfyUI (``$COMFYUI_DIR``, default ``<repo>/.cache/comfyui``;
install it with ``bash .ci/install_comfyui.sh <dir> <venv>``) with one
temporary V3 custom-node pack, and checks that the pack imports, that
/object_info lists its node, that graphs mixing it with core nodes run, that
validation errors come back as PromptRejected, and that interrupting works.
"""

from __future__ import annotations

import textwrap
import time

import pytest

from dev.comfy_harness import server as cs

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

PACK = "vilau_harness_smoke_pack"
NODE = "VILAUSmoke_Echo"

PACK_INIT = textwrap.dedent(
    '''
    """Throwaway V3 pack for the harness smoke test."""
    import time

    from comfy_api.latest import ComfyExtension, io, ui


    class SmokeEcho(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="VILAUSmoke_Echo",
                display_name="Smoke Echo",
                category="VILA-U/testing",
                description="Scales an image and echoes a text.",
                inputs=[
                    io.Image.Input("image", tooltip="Image to scale."),
                    io.String.Input("text", multiline=True, default="hello", tooltip="Text to echo."),
                    io.Float.Input("scale", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Factor."),
                    io.Int.Input("steps", default=0, min=0, max=10000, tooltip="Sleep 50 ms per step."),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                 control_after_generate=True, tooltip="Unused seed."),
                ],
                outputs=[io.Image.Output(display_name="image"), io.String.Output(display_name="text")],
                hidden=[io.Hidden.unique_id],
            )

        @classmethod
        def execute(cls, image, text, scale, steps, seed) -> io.NodeOutput:
            import comfy.utils
            from server import PromptServer

            pbar = comfy.utils.ProgressBar(max(steps, 1))
            PromptServer.instance.send_progress_text("echo: " + text, cls.hidden.unique_id)
            for _ in range(steps):
                time.sleep(0.05)
                pbar.update(1)  # the progress hook raises when interrupted
            return io.NodeOutput(image * scale, text, ui=ui.PreviewText(text))


    class SmokeExtension(ComfyExtension):
        async def get_node_list(self):
            return [SmokeEcho]


    async def comfy_entrypoint() -> SmokeExtension:
        return SmokeExtension()
    '''
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = cs.comfyui_dir()
    if not (comfy / "main.py").is_file():
        pytest.fail(cs.missing_comfyui_message(comfy), pytrace=False)
    pack = tmp_path_factory.mktemp("pack") / PACK
    pack.mkdir()
    (pack / "__init__.py").write_text(PACK_INIT)
    srv = cs.ComfyServer(comfy, tmp_path_factory.mktemp("run"), {PACK: pack})
    srv.start(timeout=180)
    print(f"ComfyUI answered after {srv.start_seconds:.1f} s on {srv.url}")
    yield srv
    srv.stop()


def echo_graph(text="hi there", scale=0.5, steps=0, prefix="smoke"):
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 32, "height": 24, "batch_size": 2, "color": 0xFF8000}},
        "2": {"class_type": NODE,
              "inputs": {"image": ["1", 0], "text": text, "scale": scale, "steps": steps, "seed": 7}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


def test_pack_imports_and_only_the_audio_extras_fail(server):
    status = server.custom_node_import_status()
    assert status.get(PACK) is True, f"{status}\n{server.log_tail()}"
    assert not server.import_failed(PACK)
    assert server.import_failed("no_such_pack")  # never listed counts as failed
    # torchaudio is not installable next to the local torch: only audio extras fail
    assert set(server.builtin_import_failures()) <= {"nodes_audio.py", "nodes_audio_encoder.py"}


def test_object_info_lists_the_node_with_its_inputs_and_outputs(server):
    info = server.object_info(NODE)
    assert info["display_name"] == "Smoke Echo"
    assert info["category"] == "VILA-U/testing"
    assert info["python_module"] == f"custom_nodes.{PACK}"
    req = info["input"]["required"]
    assert list(req) == ["image", "text", "scale", "steps", "seed"]
    assert req["image"][0] == "IMAGE"
    assert req["text"][0] == "STRING" and req["text"][1]["multiline"] is True
    assert req["seed"][1]["control_after_generate"] is True
    assert all(cfg[1].get("tooltip") for cfg in req.values())
    assert info["output"] == ["IMAGE", "STRING"]
    assert info["output_name"] == ["image", "text"]
    assert info["input"]["hidden"] == {"unique_id": ["UNIQUE_ID"]}
    everything = server.object_info()
    assert NODE in everything and "SaveImage" in everything and "CreateVideo" in everything


def test_graph_of_the_node_and_core_nodes_runs_and_writes_its_outputs(server):
    from PIL import Image

    with server.websocket() as ws:
        pid = server.queue(echo_graph(), client_id=ws.client_id)
        entry = server.wait(pid, timeout=60)
        ws.wait_for(lambda m: m.get("type") == "executing"
                    and m["data"].get("node") is None and m["data"].get("prompt_id") == pid)
        assert ws.progress_texts("2") == ["echo: hi there"]
        assert ws.of_type("execution_success")
    assert cs.status_str(entry) == "success"
    assert server.ui_text(entry, "4") == ["hi there"]  # PreviewAny
    assert server.ui_text(entry, "2") == ["hi there"]  # ui.PreviewText of the V3 node
    files = server.output_files(entry, "3")
    assert len(files) == 2 and all(f.is_file() for f in files), files
    assert all(f.parent == server.output_dir for f in files)
    with Image.open(files[0]) as im:
        assert im.size == (32, 24)
        r, g, b = im.convert("RGB").getpixel((0, 0))[:3]
    assert max(abs(r - 127), abs(g - 64), b) <= 1, (r, g, b)  # 0xFF8000 * 0.5


def test_value_out_of_range_is_rejected_as_a_validation_error(server):
    bad = echo_graph(scale=2.0)  # max is 1.0
    with pytest.raises(cs.PromptRejected) as exc:
        server.queue(bad)
    assert "2" in exc.value.node_errors
    assert exc.value.node_errors["2"]["errors"][0]["type"] == "value_bigger_than_max"
    assert "scale" in str(exc.value)


def test_interrupt_stops_the_running_prompt_within_seconds(server):
    pid = server.queue(echo_graph(text="slow", steps=1200, prefix="slow"))  # ~60 s if not stopped
    deadline = time.monotonic() + 30
    while not server.is_running(pid):
        assert time.monotonic() < deadline, "prompt never started"
        time.sleep(0.1)
    time.sleep(0.5)
    t0 = time.monotonic()
    server.interrupt()
    entry = server.wait(pid, timeout=30, check=False)
    assert time.monotonic() - t0 < 10
    assert cs.status_str(entry) == "error" and cs.was_interrupted(entry)
    assert not server.output_files(entry)
    with pytest.raises(cs.ExecutionFailed) as exc:
        server.wait(pid, timeout=5)
    assert exc.value.interrupted

"""Files and texts that are not what a node expects, through a real ComfyUI's API: a VIDEO that is
garbage, audio only or without frames gets one explanation in Video Q&A and Extend Video (they
read it the same way), and a too-long text input is named as the input it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dev.comfy_harness import server as cs
from dev.comfy_harness import workflow_api as wa

pytestmark = pytest.mark.comfyui  # starts the pinned ComfyUI: not part of the transformers 4.50.3 pass

SMALL = "vila-u-small-64"


def write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_no_frames(path: Path) -> None:
    import av

    with av.open(str(path), "w") as container:  # a video stream's header, and no frame
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vilau_backend.media.video import write_video_file

    import torch

    with cs.pack_server(tmp_path_factory.mktemp("run"), SMALL) as srv:
        (srv.input_dir / "garbage.mp4").write_bytes(b"this is not a video" * 40)
        write_audio_only(srv.input_dir / "audio_only.mp4")
        write_no_frames(srv.input_dir / "no_frames.mp4")
        write_video_file(torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)),
                         srv.input_dir / "two_frames.mp4")
        yield srv


def video_qa(video_ref) -> dict:
    return {"class_type": "VILAU_VideoQA",
            "inputs": {"model": ["1", 0], "video": video_ref, "question": "What happens?", "seed": 0,
                       "max_new_tokens": 3, "do_sample": False, "temperature": 0.9, "top_k": 50, "top_p": 0.6,
                       "repetition_penalty": 1.0}}


def extend_video(video_ref) -> dict:
    return {"class_type": "VILAU_ExtendVideo",
            "inputs": {"model": ["1", 0], "video": video_ref, "prompt": "waves", "negative_prompt": "", "cfg": 3.0,
                       "seed": 1, "batch_size": 1, "temperature": 1.0, "top_k": 900, "top_p": 0.96,
                       "add_frames": 1, "fps": 8.0}}


def failure(server, graph, node: str) -> str:
    with pytest.raises(cs.ExecutionFailed) as caught:
        server.run(graph, timeout=180)
    assert caught.value.error["node_id"] == node, caught.value.error
    return caught.value.error["exception_message"].strip()


@pytest.mark.parametrize("name, explanation", [
    ("garbage.mp4", "cannot read video '{path}': "),
    ("audio_only.mp4", "'{path}' has no video stream"),
    ("no_frames.mp4", "'{path}' has no video stream"),
])
def test_a_bad_video_file_is_explained_alike_in_video_qa_and_extend_video(server, name, explanation):
    load = {"class_type": "LoadVideo", "inputs": {"file": name}}
    preview = {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}  # Extend Video is no output node
    messages = [failure(server, {"1": wa.loader_node(SMALL), "2": load, "3": node(["2", 0]), "4": preview}, "3")
                for node in (video_qa, extend_video)]
    assert messages[0] == messages[1]
    assert messages[0].startswith(explanation.format(path=server.input_dir / name)), messages[0]


def test_extend_video_keeps_every_frame_of_a_video_file(server):
    graph = {"1": wa.loader_node(SMALL), "2": {"class_type": "LoadVideo", "inputs": {"file": "two_frames.mp4"}},
             "3": extend_video(["2", 0]),
             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "extended"}}}
    assert len(server.output_files(server.run(graph, timeout=300), "4")) == 3  # 2 given + 1 new


@pytest.mark.parametrize("too_long", ["system_prompt", "question"])
def test_a_too_long_text_input_is_named_with_its_token_count(server, too_long):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(server.input_dir / "black.png")
    inputs = {"question": "Describe the image.", "system_prompt": "You caption images.", too_long: "apple " * 9000}
    qa = {"class_type": "VILAU_ImageQA",
          "inputs": {"model": ["1", 0], "image": ["2", 0], "batch_mode": "one answer per image", "seed": 0,
                     "max_new_tokens": 3, "do_sample": False, "temperature": 0.9, "top_k": 50, "top_p": 0.6,
                     "repetition_penalty": 1.0, **inputs}}
    graph = {"1": wa.loader_node(SMALL), "2": {"class_type": "LoadImage", "inputs": {"image": "black.png"}}, "3": qa}
    message = failure(server, graph, "3")
    assert message.startswith(f"the {too_long} is too long (") and f"Shorten the {too_long}" in message

"""Reading videos: frame folders as the original samples them, and video files through PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FRAMES_DIR, recorded
from vilau_backend.errors import InputError
from vilau_backend.understand import sample_video_frames
from vilau_backend.video import read_video, uniform_frame_indices


def test_frame_folder_is_sampled_as_the_original():
    video = read_video(FRAMES_DIR, num_frames=8)
    assert video.source_frame_count == 12
    assert video.frame_indices == recorded("understanding_video_fp32")["frame_indices_expected"]
    assert video.fps is None
    assert video.frames.shape == (8, 120, 160, 3)
    for frame, index in zip(video.frames, video.frame_indices):
        png = np.asarray(Image.open(FRAMES_DIR / f"frame_{index:03d}.png").convert("RGB"), dtype=np.float32) / 255.0
        assert torch.equal(frame, torch.from_numpy(png)), f"frame {index}"


def test_describe_video_samples_frames_uniformly():
    frames = torch.arange(12, dtype=torch.float32).reshape(12, 1, 1, 1).expand(12, 4, 4, 3) / 12
    picked, indices = sample_video_frames(frames, 8)
    assert indices == [0, 2, 3, 5, 6, 8, 9, 11]  # np.round(np.linspace(0, 11, 8))
    assert torch.equal(picked, frames[indices])
    assert uniform_frame_indices(3, 8) == [0, 1, 2]


def _write_video(path: Path, codec: str, n_frames: int, fps: int = 24) -> None:
    """Frames of one flat grey each, level 10 + 20*i, so each can be told apart after compression."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i in range(n_frames):
            array = np.full((48, 64, 3), 10 + 20 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize(
    "suffix, codec", [(".mp4", "mpeg4"), (".webm", "libvpx-vp9"), (".mov", "libx264"), (".gif", "gif")]
)
def test_video_file_is_read_and_sampled(tmp_path, suffix, codec):
    path = tmp_path / f"clip{suffix}"
    _write_video(path, codec, n_frames=12)
    video = read_video(path, num_frames=8)
    assert video.source_frame_count == 12
    assert video.frame_indices == [0, 2, 3, 5, 6, 8, 9, 11]
    assert video.frames.shape == (8, 48, 64, 3) and video.frames.dtype == torch.float32
    levels = (video.frames.mean(dim=(1, 2, 3)) * 255 - 10) / 20
    assert torch.allclose(levels, torch.tensor(video.frame_indices, dtype=torch.float32), atol=0.25), levels
    if suffix != ".gif":
        assert video.fps == pytest.approx(24)


def test_whole_video_file_without_num_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, "mpeg4", n_frames=5)
    video = read_video(path)
    assert video.frame_indices == [0, 1, 2, 3, 4] and video.frames.shape[0] == 5


def test_missing_video_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        read_video(tmp_path / "empty")

"""Reading videos: frame folders as the original samples them, video files through PyAV, and which
frames the model looks at (FrameChoice: count, method, step, window)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FRAMES_DIR, recorded
from vilau_backend.errors import InputError
from vilau_backend.checkpoint.tokenizer import IMAGE_TOKEN_INDEX
from vilau_backend.tasks.understand import GREEDY, describe_video, sample_video_frames
from vilau_backend.media.video import FrameChoice, read_video, uniform_frame_indices, write_video_file


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


# ---- frame choice ----------------------------------------------------------------------


def test_default_choice_is_the_originals_uniform_spread():
    for n in (1, 5, 8, 12, 100, 1001):
        expected = np.round(np.linspace(0, n - 1, 8)).astype(int).tolist() if n > 8 else list(range(n))
        assert FrameChoice().indices(n, 8) == expected == uniform_frame_indices(n, 8)


@pytest.mark.parametrize(
    "choice, expected",
    [
        (FrameChoice(count=4), [0, 33, 66, 99]),
        (FrameChoice(count=4, method="first"), [0, 1, 2, 3]),
        (FrameChoice(count=4, method="every", step=10), [0, 10, 20, 30]),
        (FrameChoice(method="every", step=40), [0, 40, 80]),  # fewer than the default 8
        (FrameChoice(count=3, start=50, end=60), [50, 55, 60]),
        (FrameChoice(count=3, method="first", start=97), [97, 98, 99]),
        (FrameChoice(count=5, method="every", step=3, start=10, end=20), [10, 13, 16, 19]),
        (FrameChoice(count=4, end=1000), [0, 33, 66, 99]),  # an end past the video is its last frame
    ],
    ids=["uniform-4", "first-4", "every-10th", "every-40th", "uniform-window", "first-window", "every-window",
         "end-past-video"],
)
def test_choices_pick_these_frames_of_100(choice, expected):
    assert choice.indices(100, 8) == expected


def test_a_choice_short_of_frames_uses_them_all_and_warns_once_from_a_file_or_a_batch(caplog, tmp_path):
    """Video Q&A's VIDEO (read from its file) and IMAGE inputs get the same warning, from FrameChoice."""
    import logging

    short = FrameChoice(start=9)  # a window of 3 of the 12 frames, where the model's 8 are wanted
    frames = torch.rand(12, 4, 4, 3)
    for read in (lambda: read_video(FRAMES_DIR, 8, choice=short).frame_indices,
                 lambda: sample_video_frames(frames, 8, short)[1]):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vilau_backend.media.video"):
            assert read() == [9, 10, 11]
        assert [r.getMessage() for r in caplog.records] == [
            "the chosen part of the video gives 3 frames, fewer than the 8 asked for; using them"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vilau_backend.media.video"):
        assert FrameChoice(count=4).indices(12, 8) == [0, 4, 7, 11]
    assert not caplog.records  # enough frames: nothing to say


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="random"), "frame method"),
        (dict(count=0), "1 or more"),
        (dict(step=0), "frame step"),
        (dict(start=5, end=4), "window"),
        (dict(start=-1), "window"),
    ],
)
def test_invalid_choices_are_input_errors(options, message):
    with pytest.raises(InputError, match=message):
        FrameChoice(**options)


def test_window_starting_after_the_video_is_an_input_error():
    with pytest.raises(InputError, match="starts at frame 20, but the video has 12 frames"):
        FrameChoice(start=20).indices(12, 8)


def test_describe_video_uses_the_chosen_frames(golden_fp32):
    frames = torch.rand(30, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    choice = FrameChoice(count=3, method="every", step=5, start=4)
    picked, indices = sample_video_frames(frames, 8, choice)
    assert indices == [4, 9, 14] and torch.equal(picked, frames[indices])
    answer = describe_video(golden_fp32, frames, "What happens?", choice=choice, sampling=GREEDY, max_new_tokens=3)
    same = describe_video(golden_fp32, frames[indices], "What happens?", choice=None, sampling=GREEDY,
                          max_new_tokens=3)
    assert answer.input_ids.count(IMAGE_TOKEN_INDEX) == 3
    assert answer == same


def test_video_file_decodes_only_the_chosen_frames(tmp_path):
    # grey levels 8*i tell the frames apart after compression
    levels = torch.arange(24, dtype=torch.float32) * 8 / 255
    frames = levels[:, None, None, None].expand(24, 32, 32, 3).contiguous()
    path = write_video_file(frames, tmp_path / "ramp.mp4", fps=12)
    video = read_video(path, 8, choice=FrameChoice(count=4, method="every", step=3, start=6))
    assert video.frame_indices == [6, 9, 12, 15]
    assert video.source_frame_count == 24
    got = video.frames.mean(dim=(1, 2, 3)) * 255 / 8
    assert torch.allclose(got, torch.tensor([6.0, 9.0, 12.0, 15.0]), atol=0.5), got

"""Which video frames the model looks at: FrameChoice (count, method, step, window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vilau_backend.errors import InputError
from vilau_backend.prompts import IMAGE_TOKEN_INDEX
from vilau_backend.understand import GREEDY, describe_video, sample_video_frames
from vilau_backend.video import FrameChoice, read_video, uniform_frame_indices, write_video_file


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

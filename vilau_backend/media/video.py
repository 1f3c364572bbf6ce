"""Video files in and out: reading files (mp4, webm, gif, mov, ... via PyAV) and frame
folders for understanding, writing generated frames as mp4.

Both give frames as a ComfyUI-style IMAGE batch, (F, H, W, 3) float32 in 0..1,
plus the frame rate where the file records one.

Frame selection is the original's (``vila_u/utils/media.py``, ``_load_video``):
``np.round(np.linspace(0, n - 1, num)).astype(int)`` over the ``n`` frames of
the source. A frame folder is ``sorted(glob(folder/*))``, as the original, but
only image files count (the original also counts stray files such as
``Thumbs.db``, and fails if one is selected). Only the selected frames are decoded into
memory, so a long video costs one extra decoding pass (to count its frames,
which container headers often get wrong) rather than gigabytes of frames.

With fewer frames than asked for, every frame is used once. The original's
index formula would repeat frames instead; a shorter video gives the frames it has.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".m4v")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEFAULT_FPS = 8.0  # of written videos: the original's 8 generated frames make one second


@dataclass
class VideoFrames:
    frames: torch.Tensor  # (F, H, W, 3) float32 in 0..1
    fps: float | None  # None for frame folders and files that record no rate
    source_frame_count: int  # frames in the file or folder before selection
    frame_indices: list[int]  # which source frames `frames` holds, in order


def uniform_frame_indices(n_frames: int, num_frames: int | None) -> list[int]:
    """Indices of `num_frames` frames spread evenly over `n_frames`, as the original picks them.

    None, or at least as many frames wanted as there are, selects every frame once."""
    if n_frames < 1:
        raise InputError("the video has no frames")
    if num_frames is None or num_frames >= n_frames:
        return list(range(n_frames))
    if num_frames < 1:
        raise InputError(f"the number of frames to take must be 1 or more, got {num_frames}")
    return np.round(np.linspace(0, n_frames - 1, num_frames)).astype(int).tolist()


FRAME_METHODS = ("uniform", "first", "every")


@dataclass(frozen=True)
class FrameChoice:
    """Which frames of a video the model looks at.

    Frames are taken from the window ``start``..``end`` (frame indices, both included; ``end``
    None is the last frame), at most ``count`` of them (None: the count the caller gives, the
    model's ``num_video_frames``), picked by ``method``:

    - ``uniform``: spread evenly over the window, as the original picks them (the default:
      with the whole video as the window, exactly the original's frames);
    - ``first``: the first ``count`` frames of the window;
    - ``every``: every ``step``-th frame from the window's start, at most ``count``.
    """

    count: int | None = None
    method: str = "uniform"
    step: int = 1
    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        if self.method not in FRAME_METHODS:
            raise InputError(f"frame method must be one of {', '.join(FRAME_METHODS)}, got '{self.method}'")
        if self.count is not None and self.count < 1:
            raise InputError(f"the number of frames to take must be 1 or more, got {self.count}")
        if self.step < 1:
            raise InputError(f"the frame step must be 1 or more, got {self.step}")
        if self.start < 0 or (self.end is not None and self.end < self.start):
            raise InputError(
                f"the frame window {self.start}..{self.end} is empty or negative; give 0 <= start <= end"
            )

    def indices(self, n_frames: int, default_count: int | None = None) -> list[int]:
        """Indices of the chosen frames among `n_frames`, in order: `count` of them, or `default_count`
        (the model's num_video_frames) when count is None, or every one when both are None. A video
        or window too short for that many gives the frames it has, with a warning."""
        if n_frames < 1:
            raise InputError("the video has no frames")
        if self.start >= n_frames:
            raise InputError(f"the frame window starts at frame {self.start}, but the video has {n_frames} frames")
        window = range(self.start, n_frames if self.end is None else min(self.end + 1, n_frames))
        count = self.count if self.count is not None else default_count
        if self.method == "uniform":
            chosen = [window[i] for i in uniform_frame_indices(len(window), count)]
        else:
            every = window if self.method == "first" else window[:: self.step]
            chosen = list(every if count is None else every[:count])
        if count is not None and len(chosen) < count:
            log.warning("the chosen part of the video gives %d frames, fewer than the %d asked for; using them",
                        len(chosen), count)
        return chosen


def read_video(
    path: str | os.PathLike, num_frames: int | None = None, *, choice: FrameChoice | None = None
) -> VideoFrames:
    """A video file or a folder of frames -> VideoFrames; `num_frames` selects evenly spaced frames,
    `choice` other ones (`num_frames` is then its default count). Only the chosen frames are decoded."""
    path = Path(path)
    choice = choice or FrameChoice()
    if path.is_dir():
        return read_frame_folder(path, num_frames, choice=choice)
    if path.is_file():
        return read_video_file(path, num_frames, choice=choice)
    raise InputError(
        f"video '{path}' does not exist; give a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames"
    )


def read_frame_folder(
    folder: str | os.PathLike, num_frames: int | None = None, *, choice: FrameChoice = FrameChoice()
) -> VideoFrames:
    from PIL import Image, UnidentifiedImageError

    # as the original: sorted(glob(folder/*)), i.e. by file name, hidden files excluded
    paths = [p for p in sorted(glob.glob(os.path.join(str(folder), "*"))) if p.lower().endswith(FRAME_SUFFIXES)]
    if not paths:
        raise InputError(f"frame folder '{folder}' holds no image files ({', '.join(FRAME_SUFFIXES)})")
    indices = choice.indices(len(paths), num_frames)
    frames = []
    for index in indices:
        try:
            with Image.open(paths[index]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"cannot read frame '{paths[index]}': {exc}") from exc
    return VideoFrames(_stack(frames, str(folder)), fps=None, source_frame_count=len(paths), frame_indices=indices)


def read_video_file(
    path: str | os.PathLike, num_frames: int | None = None, *, choice: FrameChoice = FrameChoice()
) -> VideoFrames:
    try:
        import av
    except ImportError as exc:
        raise InputError(f"reading video '{path}' needs PyAV; install it with `pip install av`") from exc

    try:
        if num_frames is None and choice == FrameChoice():
            frames, fps = _decode_frames(av, path, wanted=None)
            indices = list(range(len(frames)))
            count = len(frames)
        else:
            count = _count_frames(av, path)
            indices = choice.indices(count, num_frames)
            frames, fps = _decode_frames(av, path, wanted=set(indices))
    except av.error.FFmpegError as exc:
        raise InputError(f"cannot read video '{path}': {exc}") from exc
    if not frames:
        raise InputError(f"video '{path}' has no frames")
    if len(frames) != len(indices):
        raise InputError(
            f"video '{path}' yielded {len(frames)} of the {len(indices)} selected frames; the file may be damaged"
        )
    return VideoFrames(_stack(frames, str(path)), fps=fps, source_frame_count=count, frame_indices=indices)


def _video_stream(container, path):
    if not container.streams.video:
        raise InputError(f"'{path}' has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _count_frames(av, path) -> int:
    # decoded, not read from the header: as the original, which does not trust CAP_PROP_FRAME_COUNT
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(_video_stream(container, path)))


def _decode_frames(av, path, wanted: set[int] | None) -> tuple[list[np.ndarray], float | None]:
    """RGB uint8 frames (H, W, 3) at the `wanted` indices (all when None), and the stream's frame rate."""
    frames = []
    last = max(wanted) if wanted else None
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        fps = float(stream.average_rate) if stream.average_rate else None
        for index, frame in enumerate(container.decode(stream)):
            if wanted is None or index in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if last is not None and index >= last:
                break
    return frames, fps


def _stack(frames: list[np.ndarray], source: str) -> torch.Tensor:
    """RGB uint8 (H, W, 3) frames -> (F, H, W, 3) float32 in 0..1 (k/255, as ComfyUI loads images)."""
    sizes = {frame.shape for frame in frames}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for h, w, _ in sorted(sizes))
        raise InputError(f"the frames of '{source}' differ in size ({listed}); give frames of one size")
    return torch.from_numpy(np.stack(frames)).float().div_(255.0)


def write_video_file(frames: torch.Tensor, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    """Frames (F, H, W, 3) float 0..1 -> an H.264 mp4 (yuv420p, playable everywhere)."""
    import av
    from fractions import Fraction

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InputError(f"expected frames shaped (frames, height, width, 3), got {tuple(frames.shape)}")
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    height, width = array.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        # yuv420p needs even sides; the published models make 256 or 384 px frames
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuv420p"
        for image in array:
            frame = av.VideoFrame.from_ndarray(image[: stream.height, : stream.width], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path

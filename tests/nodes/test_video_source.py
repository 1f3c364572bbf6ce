"""Video Q&A reads a VIDEO's file directly only when the VIDEO is that whole file
(nodes/video_source.py). The classes below mimic comfy_api's VideoFromFile of ComfyUI 0.3.75
(a file, nothing else) and of the newest ComfyUI (a lazy trim window and crop, which its
get_duration() and get_dimensions() report, as the newest core's do), and a lazily cropped or
wrapped video; their files are a table of (duration, (width, height)). The pinned core's own
class is checked in tests/comfyui/test_core_contracts.py."""

from __future__ import annotations

import io

import pytest

from conftest import pack_module

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)

FILES = {"/v/a.mp4": (10.0, (64, 48))}


@pytest.fixture(scope="module")
def whole_file_path():
    return pack_module("video_source").whole_file_path


def measure(file) -> tuple[float, tuple[int, int]]:
    if file not in FILES:
        raise ValueError(f"cannot read '{file}'")  # as PyAV does for a damaged file
    return FILES[file]


class VideoFromFile:  # ComfyUI 0.3.75
    def __init__(self, file):
        self.__file = file

    def get_stream_source(self):
        return self.__file

    def get_duration(self):
        return measure(self.__file)[0]

    def get_dimensions(self):
        return measure(self.__file)[1]


def newest_class():
    class VideoFromFile:  # the newest ComfyUI: trims and crops lazily, keeps the whole file as its source
        def __init__(self, file, *, start_time: float = 0, duration: float = 0, crop=None):
            self.__file = file
            self.__start_time = start_time
            self.__duration = duration
            self.__crop = crop

        def get_stream_source(self):
            return self.__file

        def get_duration(self):
            raw = measure(self.__file)[0]
            from_start = min(raw, -self.__start_time) if self.__start_time < 0 else raw - self.__start_time
            return min(self.__duration, from_start) if self.__duration else from_start

        def get_dimensions(self):
            return measure(self.__file)[1] if self.__crop is None else tuple(self.__crop[2:])

    return VideoFromFile


def test_an_untouched_file_is_read_directly(whole_file_path):
    assert whole_file_path(VideoFromFile("/v/a.mp4"), VideoFromFile) == "/v/a.mp4"
    newest = newest_class()
    assert whole_file_path(newest("/v/a.mp4"), newest) == "/v/a.mp4"


@pytest.mark.parametrize("window", [dict(start_time=1.5), dict(duration=2.0), dict(start_time=-3.0),
                                    dict(crop=(0, 0, 32, 32)), dict(crop=(16, 8, 48, 40))])
def test_a_lazily_trimmed_or_cropped_file_is_decoded_through_its_components(whole_file_path, window):
    newest = newest_class()
    assert whole_file_path(newest("/v/a.mp4", **window), newest) is None


@pytest.mark.parametrize("window", [dict(duration=10.0), dict(duration=60.0), dict(start_time=-10.0),
                                    dict(crop=(0, 0, 64, 48))])
def test_a_window_that_covers_the_whole_file_reads_the_file(whole_file_path, window):
    newest = newest_class()
    assert whole_file_path(newest("/v/a.mp4", **window), newest) == "/v/a.mp4"


def test_a_damaged_file_is_read_directly_so_that_reading_it_says_what_is_wrong(whole_file_path):
    assert whole_file_path(VideoFromFile("/v/garbage.mp4"), VideoFromFile) == "/v/garbage.mp4"


def test_a_core_whose_video_holds_more_than_a_trim_and_a_crop_is_decoded(whole_file_path):
    class Retimed(VideoFromFile):  # a hypothetical lazy speed change: same size, maybe even the same length
        def __init__(self, file, *, speed: float = 1.0):
            super().__init__(file)

    assert whole_file_path(Retimed("/v/a.mp4"), Retimed) is None


def test_subclasses_wrappers_and_in_memory_files_are_not_read_directly(whole_file_path):
    class Muted(VideoFromFile):  # e.g. a pack's wrapper that drops the audio or crops
        pass

    assert whole_file_path(Muted("/v/a.mp4"), VideoFromFile) is None
    assert whole_file_path(object(), VideoFromFile) is None
    assert whole_file_path(VideoFromFile(io.BytesIO(b"...")), VideoFromFile) is None

"""Video Q&A reads a VIDEO's file directly only when the VIDEO is that whole file
(nodes/video_source.py). The classes below mimic comfy_api's VideoFromFile of ComfyUI 0.3.75
(a file, nothing else), of the newest ComfyUI (a lazy trim window with
get_active_trim_window()), of versions in between (the window without the method), and of
a lazily cropped or wrapped video; their attribute names are those ComfyUI's use."""

from __future__ import annotations

import pytest

from conftest import pack_module

pytestmark = pytest.mark.no_transformers  # the 4.50.3 pass leaves it out (tests/conftest.py)


@pytest.fixture(scope="module")
def whole_file_path():
    return pack_module("video_source").whole_file_path


class VideoFromFile:  # ComfyUI 0.3.75
    def __init__(self, file):
        self.__file = file

    def get_stream_source(self):
        return self.__file


def newest_class():
    class VideoFromFile:  # the newest ComfyUI: trims lazily, keeps the whole file as its source
        def __init__(self, file, *, start_time: float = 0, duration: float = 0):
            self.__file = file
            self.__start_time = start_time
            self.__duration = duration

        def get_stream_source(self):
            return self.__file

        def get_active_trim_window(self):
            return float(self.__start_time), float(self.__duration)

    return VideoFromFile


def between_class():
    class VideoFromFile:  # a trim window kept without get_active_trim_window
        def __init__(self, file, start_time: float = 0, crop=None):
            self.__file = file
            self.__start_time = start_time
            self.__crop = crop

        def get_stream_source(self):
            return self.__file

    return VideoFromFile


def test_an_untouched_file_is_read_directly(whole_file_path):
    assert whole_file_path(VideoFromFile("/v/a.mp4"), VideoFromFile) == "/v/a.mp4"
    newest = newest_class()
    assert whole_file_path(newest("/v/a.mp4"), newest) == "/v/a.mp4"
    between = between_class()
    assert whole_file_path(between("/v/a.mp4", crop=(0, 0, 0, 0)), between) == "/v/a.mp4"  # empty crop: none


@pytest.mark.parametrize("window", [dict(start_time=1.5), dict(duration=2.0), dict(start_time=-3.0)])
def test_a_lazily_trimmed_file_is_decoded_through_its_components(whole_file_path, window):
    newest = newest_class()
    assert whole_file_path(newest("/v/a.mp4", **window), newest) is None


@pytest.mark.parametrize("state", [dict(start_time=0.5), dict(crop=(0, 0, 32, 32))])
def test_trims_and_crops_kept_in_attributes_are_seen_too(whole_file_path, state):
    between = between_class()
    assert whole_file_path(between("/v/a.mp4", **state), between) is None


def test_subclasses_wrappers_and_in_memory_files_are_not_read_directly(whole_file_path):
    class Muted(VideoFromFile):  # e.g. a pack's wrapper that drops the audio or crops
        pass

    assert whole_file_path(Muted("/v/a.mp4"), VideoFromFile) is None
    assert whole_file_path(object(), VideoFromFile) is None
    import io

    assert whole_file_path(VideoFromFile(io.BytesIO(b"...")), VideoFromFile) is None

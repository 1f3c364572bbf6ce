"""When a VIDEO may be read straight from its file.

Reading the file lets Video Q&A decode only the frames the model takes. But a VIDEO is not
always its whole file: newer ComfyUI trims and crops lazily (`VideoFromFile(file, start_time=,
duration=, crop=)`, made by `as_trimmed` / `as_cropped`) while `get_stream_source()` still
returns the whole file, and other packs wrap or subclass it. So the file is read only when the
VIDEO is exactly a `VideoFromFile`, its class holds nothing the checks below cannot see, and it
shows what a fresh `VideoFromFile` of its file shows: the same duration (a trim shortens it) and
the same frame size (a crop shrinks it), both asked through `VideoInput`'s public methods, which
ComfyUI 0.3.75 and the newest both have. Every other VIDEO is decoded through
`get_components()`, which applies the trim and the crop.
"""

from __future__ import annotations

import inspect

# The arguments of VideoFromFile in ComfyUI 0.3.75 (`file`) up to the newest (a lazy trim and crop);
# each changes what get_duration() or get_dimensions() report. A core whose VideoFromFile takes
# anything else (a lazy speed change, say) may show a different video at the same size and length,
# so such a VIDEO is decoded (tests/comfyui/test_core_contracts.py checks the pinned core's list).
KNOWN_FILE_ARGUMENTS = frozenset({"file", "start_time", "duration", "crop"})


def whole_file_path(video, file_class: type) -> str | None:
    """The path of the file `video` shows in full, or None when it is not exactly that file.
    `file_class`: comfy_api's VideoFromFile (passed in, so this module needs no ComfyUI)."""
    if type(video) is not file_class:  # a subclass or wrapper may show something else than its file
        return None
    if not set(inspect.signature(file_class).parameters) <= KNOWN_FILE_ARGUMENTS:
        return None
    source = video.get_stream_source()
    if not isinstance(source, str):  # in memory: nothing to read by path
        return None
    try:
        whole = extent(file_class(source))
    except Exception:  # PyAV raises many kinds: the file itself is damaged, and reading it says how
        return source
    try:
        return source if extent(video) == whole else None
    except Exception:  # the file measures, its trimmed or cropped view does not: decode the view
        return None


def extent(video) -> tuple:
    """What a trim or a crop changes: the duration in seconds and the frame size (width, height)."""
    return video.get_duration(), tuple(video.get_dimensions())

"""When a VIDEO may be read straight from its file.

Reading the file lets Video Q&A decode only the frames the model takes. But a VIDEO is not
always its whole file: newer ComfyUI trims and crops lazily (`VideoFromFile` keeps a trim
window, `get_active_trim_window()`; `as_cropped` and other packs wrap the file) while
`get_stream_source()` still returns the whole file. Only an untouched `VideoFromFile` takes
the file path; every other VIDEO is decoded through `get_components()`, which applies the
trim and the crop (ComfyUI 0.3.75 and the newest alike).
"""

from __future__ import annotations


def whole_file_path(video, file_class: type) -> str | None:
    """The path of the file `video` shows in full, or None when it is not exactly that file.
    `file_class`: comfy_api's VideoFromFile (passed in, so this module needs no ComfyUI)."""
    if type(video) is not file_class:  # a subclass or wrapper may show something else than its file
        return None
    trim_window = getattr(video, "get_active_trim_window", None)
    if callable(trim_window) and any(float(v) != 0.0 for v in trim_window()):
        return None
    # versions between 0.3.75 and the newest keep a trim or crop in (name-mangled) attributes
    for name, value in vars(video).items():
        name = name.lower()
        if ("start_time" in name or "duration" in name or "crop" in name) and _is_set(value):
            return None
    source = video.get_stream_source()
    return source if isinstance(source, str) else None


def _is_set(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_is_set(v) for v in value)
    return value is not None and value is not False and value != 0

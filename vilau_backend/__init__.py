"""VILA-U as a library: load a published checkpoint, understand and generate images and videos.

Pure torch + transformers; never imports ComfyUI. Entry point: `VilaUModel.load(folder, dtype, device)`.
The layers (docs/ARCHITECTURE.md), each importing only those listed before it: `errors`,
`checkpoint`, `memory`, `media`, `model`, `decoding`, `tasks`, `testing`, `jobs`, then `cli`.
"""

from .errors import CheckpointError, GenerationCancelled, InputError, VilaUError

# name -> the module that defines it; imported on first use, so that importing the package
# (as the nodes do at ComfyUI start-up) loads neither torch nor transformers
_PUBLIC = {
    "VilaUModel": "model.vila_u",
    "ImageSampling": "tasks.requests",
    "ImageRequest": "tasks.requests",
    "EditRequest": "tasks.requests",
    "AnswerRequest": "tasks.requests",
    "GeneratedImages": "tasks.generate",
    "generate_images": "tasks.generate",
    "generate_video": "tasks.generate",
    "TextSampling": "tasks.understand",
    "describe_images": "tasks.understand",
    "describe_video": "tasks.understand",
    "inpaint": "tasks.editing",
    "vary_by_depth": "tasks.editing",
    "continue_downward": "tasks.editing",
    "extend_video": "tasks.editing",
    "caption_folder": "tasks.captioning",
    "CaptionSettings": "tasks.captioning",
    "read_video": "media.video",
    "write_random_checkpoint": "testing.random_checkpoint",
}

__all__ = ["CheckpointError", "GenerationCancelled", "InputError", "VilaUError", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        from importlib import import_module

        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

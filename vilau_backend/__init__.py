"""VILA-U as a library: load a published checkpoint, understand and generate images and videos.

Pure torch + transformers; never imports ComfyUI. Entry point: `VilaUModel.load(folder, dtype, device)`.
"""

from .errors import CheckpointError, GenerationCancelled, InputError, VilaUError

__all__ = ["CheckpointError", "GenerationCancelled", "InputError", "VilaUError", "VilaUModel"]


def __getattr__(name: str):
    # torch and transformers load only when the model is actually used
    if name == "VilaUModel":
        from .model import VilaUModel

        return VilaUModel
    raise AttributeError(name)

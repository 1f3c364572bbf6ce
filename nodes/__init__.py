"""ComfyUI node classes (V3 schema), one module per family; the model work is in vilau_backend."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .example_inputs import install_into_comfyui_input as install_example_inputs
from .model_files import register_folder

__all__ = ["VilaUExtension", "install_example_inputs", "register_folder"]


class VilaUExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .captioning import CaptionFolder
        from .editing import ContinueImage, ExtendVideo, Inpaint, VaryByDepth
        from .generation import TextToImage, TextToVideo
        from .loader import ModelLoader, UnloadModel
        from .rqvae import RQVAEDecode, RQVAEEncode
        from .understanding import ImageQA, VideoQA

        return [
            ModelLoader, UnloadModel, ImageQA, VideoQA, CaptionFolder, TextToImage, TextToVideo, RQVAEEncode,
            RQVAEDecode, Inpaint, VaryByDepth, ContinueImage, ExtendVideo,
        ]

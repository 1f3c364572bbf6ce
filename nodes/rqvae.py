"""VILA-U RQ-VAE Encode and Decode: images to the model's residual-quantized latent and back.

The LATENT is built and read in vilau_latent.py. Decoding reads `samples` only, so blends,
batches and upscales made by core latent nodes still decode; the codes, which those nodes
carry along unchanged (and then stale), are for code-level work.
"""

from __future__ import annotations

from comfy_api.latest import io

from .model_cache import releases_after_use
from .schema import CATEGORY, model_input
from .vilau_latent import make_vilau_latent, vilau_latent_features


class RQVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VILAU_RQVAEEncode",
            display_name="VILA-U RQ-VAE Encode",
            category=CATEGORY,
            description=(
                "Encodes images into VILA-U's residual-quantized latent (the codes the model reads and writes). "
                "Images of any size are resized to the model's square input, as the model's own preprocessing."
            ),
            inputs=[model_input(), io.Image.Input("image", tooltip="The image(s) to encode.")],
            outputs=[
                io.Latent.Output(
                    display_name="latent",
                    tooltip="samples = summed code embeddings (B, C, h, w), plus the codes (B, h, w, depth).",
                )
            ],
        )

    @classmethod
    @releases_after_use
    def execute(cls, model, image) -> io.NodeOutput:
        vila = model.ready()
        encoded = vila.encode_images(image)
        return io.NodeOutput(make_vilau_latent(vila, encoded.features, encoded.codes))


class RQVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VILAU_RQVAEDecode",
            display_name="VILA-U RQ-VAE Decode",
            category=CATEGORY,
            description="Decodes a VILA-U latent into images at the model's size.",
            inputs=[
                model_input(),
                io.Latent.Input(
                    "latent",
                    tooltip="A VILA-U latent (from RQ-VAE Encode, Text to Image or Text to Video), also after core "
                    "latent nodes such as Latent Blend, Latent From Batch or Upscale Latent. A latent whose grid "
                    "was resized is interpolated back to the model's grid (e.g. 16x16), so the image comes out at "
                    "the model's size; upscale the decoded image instead to get a larger one.",
                ),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The decoded images, at the model's size.")],
        )

    @classmethod
    @releases_after_use
    def execute(cls, model, latent) -> io.NodeOutput:
        vila = model.ready()
        return io.NodeOutput(vila.decode_features(vilau_latent_features(vila, latent)))

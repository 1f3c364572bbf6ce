"""VILA-U RQ-VAE Encode and Decode: images to the model's residual-quantized latent and back.

The LATENT (DESIGN.md): {"samples": float (B, C, h, w) summed code embeddings,
"vilau_codes": long (B, h, w, D)}. Decoding reads `samples` only, so blends,
batches and upscales made by core latent nodes still decode; the codes, which
those nodes carry along unchanged (and then stale), are for code-level work.
"""

from __future__ import annotations

from comfy_api.latest import io

from .schema import CATEGORY, model_input


def vilau_latent(features, codes) -> dict:
    """features (B, h, w, C), codes (B, h, w, D) on any device -> a ComfyUI LATENT, on the CPU as core latents."""
    samples = features.permute(0, 3, 1, 2).float().contiguous().cpu()  # (B, C, h, w)
    return {"samples": samples, "vilau_codes": codes.long().cpu()}


def latent_features(model, samples):
    """LATENT samples (B, C, h, w) -> decoder features (B, h', w', C) on the model's grid."""
    import torch.nn.functional as F

    from ..vilau_backend.errors import InputError

    c = model.config.quantizer.embed_dim
    h, w = model.config.grid
    if samples.ndim != 4 or samples.shape[1] != c:
        shape = "x".join(str(s) for s in samples.shape)
        raise InputError(
            f"this LATENT is not a VILA-U latent of this model: its samples are {shape} (batch, channels, "
            f"height, width) and this model's RQ-VAE latents have {c} channels on a grid of {h}x{w}. Connect the "
            "latent of VILA-U RQ-VAE Encode, Text to Image or Text to Video made with the same model; latents "
            "of other models (Empty Latent Image, VAE Encode, KSampler) decode with VAE Decode"
        )
    if tuple(samples.shape[-2:]) != (h, w):
        # a core upscale or crop changed the grid: the decoder only knows the model's grid
        samples = F.interpolate(samples.float(), size=(h, w), mode="bilinear", align_corners=False)
    return samples.permute(0, 2, 3, 1)


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
    def execute(cls, model, image) -> io.NodeOutput:
        encoded = model.ready().encode_images(image)
        return io.NodeOutput(vilau_latent(encoded.features, encoded.codes))


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
    def execute(cls, model, latent) -> io.NodeOutput:
        vila = model.ready()
        return io.NodeOutput(vila.decode_features(latent_features(vila, latent["samples"])))

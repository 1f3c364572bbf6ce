"""The VILA-U LATENT: the one place that builds it and the one place that reads it back.

    {"samples": float (B, C, h, w) summed code embeddings, on the CPU as core latents,
     "vilau_codes": long (B, h, w, D) the codes,
     "vilau_model": {"name": model folder name, "latent_space": id of its codebooks}}

Core latent nodes (Latent Blend, Upscale Latent, Latent From Batch, Latent Batch, in ComfyUI
0.3.75 and the newest) copy the dict and replace `samples`, so the extra keys travel along:
the model stamp stays right (a blend of two latents of one model is still that model's), but
the codes go stale. Hence two readers:

- `vilau_latent_features`: what decoding needs, `samples`, refused when another model made them;
- `vilau_latent_codes`: what code-level work needs, the codes, refused when `samples` no longer
  equals their summed embedding (a core node changed the latent after the codes were made).
"""

from __future__ import annotations

CODES_KEY = "vilau_codes"
MODEL_KEY = "vilau_model"
# samples are stored in float32 whatever the model dtype; a bf16 model's sums differ from an fp32
# model's by bf16 rounding (2^-8 relative), any core edit (blend, resize) by far more
STALE_RELATIVE = 1e-2


def make_vilau_latent(vila, features, codes) -> dict:
    """features (B, h, w, C), codes (B, h, w, D) on any device -> a LATENT stamped with `vila`'s latent space."""
    samples = features.permute(0, 3, 1, 2).float().contiguous().cpu()  # (B, C, h, w)
    return {"samples": samples, CODES_KEY: codes.long().cpu(), MODEL_KEY: model_stamp(vila)}


def model_stamp(vila) -> dict:
    """{"name", "latent_space"}; latent_space None when the checkpoint can no longer be read (moved or
    deleted after loading): such latents are not compared rather than failing a finished generation."""
    from ..vilau_backend.errors import CheckpointError
    from ..vilau_backend.checkpoint.latent_space import latent_space_id

    try:
        space = latent_space_id(vila.config.vision_tower_dir)
    except (OSError, CheckpointError):
        space = None
    return {"name": vila.config.root.name, "latent_space": space}


def vilau_latent_features(vila, latent) -> "torch.Tensor":  # noqa: F821
    """A LATENT -> decoder features (B, h, w, C) on `vila`'s grid, after checking that it is one of
    `vila`'s latents. A grid a core node resized is interpolated back to the model's grid."""
    import torch.nn.functional as F

    samples = _checked_samples(vila, latent)
    h, w = vila.config.grid
    if tuple(samples.shape[-2:]) != (h, w):
        # a core upscale or crop changed the grid: the decoder only knows the model's grid
        samples = F.interpolate(samples.float(), size=(h, w), mode="bilinear", align_corners=False)
    return samples.permute(0, 2, 3, 1)


def vilau_latent_codes(vila, latent) -> "torch.Tensor":  # noqa: F821
    """A LATENT -> its codes (B, h, w, D), checked to be `vila`'s and to still describe `samples`."""
    from ..vilau_backend.errors import InputError

    samples = _checked_samples(vila, latent)
    codes = latent.get(CODES_KEY)
    if codes is None:
        raise InputError(
            "this LATENT carries no VILA-U codes (a saved and loaded latent keeps only its samples): connect the "
            "latent of VILA-U RQ-VAE Encode or Text to Image, or decode this one and encode the image again"
        )
    vila.check_codes(codes)
    features = vila.codes_to_features(codes).permute(0, 3, 1, 2).float().cpu()  # (B, C, h, w)
    scale = features.abs().max().clamp(min=1e-6)
    if samples.shape != features.shape or (samples.float() - features).abs().max() > STALE_RELATIVE * scale:
        raise InputError(
            "this latent's samples were changed after its codes were made (by a core latent node such as Latent "
            "Blend, Upscale Latent or Latent From Batch), so its VILA-U codes are stale: decode it with VILA-U "
            "RQ-VAE Decode and encode the image again with VILA-U RQ-VAE Encode to get codes that match"
        )
    return codes


def _checked_samples(vila, latent):
    """`samples` (B, C, h, w) of a LATENT, after the checks every reader needs."""
    import torch

    from ..vilau_backend.errors import InputError

    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise InputError(
            "this LATENT has no 'samples' tensor: connect the latent output of VILA-U RQ-VAE Encode, Text to Image "
            "or Text to Video (or of a core latent node fed by one)"
        )
    _check_model(vila, latent.get(MODEL_KEY))
    c = vila.config.quantizer.embed_dim
    h, w = vila.config.grid
    shape = "x".join(str(s) for s in samples.shape)
    if samples.ndim != 4 or samples.shape[1] != c:
        raise InputError(
            f"this LATENT is not a VILA-U latent of this model: its samples are {shape} (batch, channels, "
            f"height, width) and this model's RQ-VAE latents have {c} channels on a grid of {h}x{w}. Connect the "
            "latent of VILA-U RQ-VAE Encode, Text to Image or Text to Video made with the same model; latents "
            "of other models (Empty Latent Image, VAE Encode, KSampler) decode with VAE Decode"
        )
    if samples.shape[0] == 0:
        raise InputError("this LATENT is an empty batch (0 images): check the batch index and length of the "
                         "latent nodes before it")
    if samples.shape[2] == 0 or samples.shape[3] == 0:
        raise InputError(f"this LATENT has an empty grid ({shape}): a crop or resize before it left no "
                         f"positions; the model's grid is {h}x{w}")
    if not torch.isfinite(samples).all():
        raise InputError("this LATENT holds NaN or infinite values: the node that made it failed; run it again")
    return samples


def _check_model(vila, stamp) -> None:
    from ..vilau_backend.errors import InputError

    if not isinstance(stamp, dict) or stamp.get("latent_space") is None:
        return  # made before latents were stamped, or rebuilt by another node: nothing to compare
    mine = model_stamp(vila)
    if mine["latent_space"] is not None and stamp["latent_space"] != mine["latent_space"]:
        raise InputError(
            f"this latent was made by the VILA-U model '{stamp.get('name', '?')}', whose codebooks differ from "
            f"those of '{mine['name']}', the model connected here: its values mean nothing to this model. "
            f"Connect the model that made it, or decode it with that model and encode the image with this one"
        )

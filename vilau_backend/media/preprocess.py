"""Image preprocessing as the original's process_images, from ComfyUI-style tensors.

ComfyUI images are float (B, H, W, C) in 0..1 with C = 1, 3 or 4. The original
works on 8-bit PIL images: 'resize' resizes straight to the model's square size
with PIL's bicubic filter; 'pad' first pastes the image centred on a grey
(127, 127, 127) square. Then pixels are scaled to -1..1 (mean = std = 0.5).
Going through 8-bit PIL here is deliberate: it reproduces the original's
resampling exactly, and an image that came from LoadImage (k/255 values)
round-trips to the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

PAD_GREY = (127, 127, 127)  # as the original: tuple(int(x * 255) for x in image_mean=0.5)


def to_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, C) float 0..1 with C in {1, 3, 4} -> (B, H, W, 3) uint8. Alpha is dropped, as PIL's convert('RGB')."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InputError(
            f"expected images shaped (batch, height, width, channels) with 1, 3 or 4 channels, got {tuple(images.shape)}"
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise InputError(f"the image batch is empty: shape {tuple(images.shape)}")
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    elif images.shape[-1] == 4:
        images = images[..., :3]
    array = images.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return array


def square_pad(image: Image.Image, fill: tuple[int, int, int] = PAD_GREY) -> Image.Image:
    """Paste the image centred on a square canvas, as the original's expand2square."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_images(images: torch.Tensor, size: int, aspect: str) -> torch.Tensor:
    """(B, H, W, C) float 0..1 -> pixel_values (B, 3, size, size) float32 in -1..1."""
    if aspect not in ("resize", "pad"):
        raise InputError(f"image_aspect_ratio {aspect!r} is not supported; use 'resize' or 'pad'")
    batch = []
    for array in to_rgb_uint8(images):
        image = Image.fromarray(array, mode="RGB")
        if aspect == "pad":
            image = square_pad(image)
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
        batch.append(np.asarray(image))
    pixels = np.stack(batch).transpose(0, 3, 1, 2)  # (B, 3, S, S) uint8
    # as CLIPImageProcessor, bit for bit: rescale by 1/255 in float64, cast to float32,
    # then normalise with mean = std = 0.5 in float32
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy((scaled - np.float32(0.5)) / np.float32(0.5)).contiguous()


def to_comfy_images(raw: torch.Tensor) -> torch.Tensor:
    """Raw decoder output (B, 3, H, W), about -1..1 -> ComfyUI IMAGE (B, H, W, 3) float32 in 0..1.

    The original maps x -> clamp((x + 1) * 127.5, 0, 255); dividing by 255 keeps
    exactly that image (its PNGs are the uint8 truncation of it)."""
    return raw.float().add(1).mul(127.5).clamp(0, 255).div(255).permute(0, 2, 3, 1).contiguous()

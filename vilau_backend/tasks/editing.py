"""Editing in VILA-U's code space: inpaint, vary by depth, continue downward, extend a video.

Every edit is one call of `generate_codes` with an `EditRequest` (generate.py, requests.py):
the codes of a source (encoded image, latent or video frames) are given, and a
boolean `keep` (B, P, D) says which of them stay; the rest are sampled under the
prompt, each position seeing the kept codes before it, exactly as if the model
had generated them. The functions here build those masks:

- inpaint: a pixel MASK -> the grid positions to regenerate (`regenerate_from_mask`),
  every depth of the others kept (`keep_positions`);
- vary by depth: the first k residual depths of every position kept (`keep_depths`),
  k from a 0..1 strength (`depths_for_strength`): the composition stays, detail changes;
- continue downward: the first N rows kept (`keep_rows`);
- extend a video: the given frames kept as the first frames (`keep_frames`).

The request's `num_images` is how many edits to make of each source (a video: how many
continuations): `edits_of_sources` repeats every source that many times, source after source
(edit i samples with seed index i), into the `EditRequest` of the whole batch.

Positions kept entirely at the start (continue, extend) are prefilled in one
batched LLM forward. After decoding, `paste_outside` puts the source pixels back
where nothing was regenerated, with a feathered edge.

Shapes: N sources, B = N x num_images edits, S model image size, h x w grid, P positions, D depth, F frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from ..decoding.compiled_steps import CompileCallback
from ..errors import InputError
from .generate import GeneratedImages, PositionCallback, decode_images, decode_videos, generate_codes
from .requests import EditRequest, ImageRequest, image_request

DEFAULT_MASK_THRESHOLD = 0.5  # a position is regenerated when at least half its pixels are masked
DEFAULT_FEATHER = 8  # pixels over which pasted-back source pixels blend into an inpainting
DEFAULT_STRENGTH = 0.5  # vary by depth: half the residual depths kept


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI MASK (H, W) or (B, H, W), any float range -> (B, H, W) float32 clamped to 0..1, on the CPU."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise InputError(f"a mask is shaped (height, width) or (batch, height, width), got {tuple(mask.shape)}")
    return mask.detach().float().cpu().clamp(0, 1)


def _pad_to_square(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, S, S), centred as the model's 'pad' preprocessing; the padding is unmasked."""
    H, W = mask.shape[-2:]
    side = max(H, W)
    top, left = (side - H) // 2, (side - W) // 2
    return F.pad(mask, (left, side - W - left, top, side - H - top))


def mask_coverage(mask: torch.Tensor, grid: tuple[int, int], aspect: str = "resize") -> torch.Tensor:
    """The fraction of each grid position's pixels that the mask covers: (B, H, W) -> (B, h, w) in 0..1.

    The mask goes through the geometry of the model's preprocessing (aspect 'resize': stretched
    to the square; 'pad': centred on it), so its positions line up with the encoded image's."""
    m = as_mask_batch(mask)[:, None]  # (B, 1, H, W)
    if aspect == "pad":
        m = _pad_to_square(m)
    return F.adaptive_avg_pool2d(m, grid)[:, 0]  # (B, h, w)


def grow_positions(regenerate: torch.Tensor, by: int) -> torch.Tensor:
    """Grow (by > 0) a region of grid positions by `by` positions in every direction, 8-connected.
    regenerate: (B, h, w) bool -> (B, h, w) bool."""
    if by <= 0:
        return regenerate
    grown = F.max_pool2d(regenerate[:, None].float(), kernel_size=2 * by + 1, stride=1, padding=by)
    return grown[:, 0] > 0


def regenerate_from_mask(
    mask: torch.Tensor, grid: tuple[int, int], *, aspect: str = "resize",
    threshold: float = DEFAULT_MASK_THRESHOLD, grow: int = 0,
) -> torch.Tensor:
    """The rule for inpainting: a grid position is regenerated when at least `threshold` of its
    pixels are masked (a soft mask counts each pixel by its value), then the region
    grows by `grow` positions. (B, H, W) -> (B, h, w) bool."""
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"the mask threshold must be in (0, 1], got {threshold}")
    if grow < 0:
        raise InputError(f"grow must be >= 0 positions, got {grow}")
    return grow_positions(mask_coverage(mask, grid, aspect) >= threshold - 1e-6, grow)


def keep_positions(regenerate: torch.Tensor, depth: int) -> torch.Tensor:
    """Inpaint: every depth of the positions not regenerated is kept. (B, h, w) bool -> keep (B, P, D)."""
    B = regenerate.shape[0]
    return (~regenerate).reshape(B, -1, 1).expand(-1, -1, depth).clone()


def depths_for_strength(strength: float, depth: int) -> int:
    """Vary by depth: how many residual depths to keep for a variation strength in 0..1
    (0 keeps all D depths: the source itself; 1 keeps none: a new image from the prompt)."""
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in 0..1, got {strength}")
    return int(round((1.0 - strength) * depth))


def keep_depths(batch: int, positions: int, depth: int, kept: int) -> torch.Tensor:
    """Vary by depth: the first `kept` of the D residual depths of every position. -> keep (B, P, D)."""
    if not 0 <= kept <= depth:
        raise InputError(f"the depths to keep must be in 0..{depth} for this model, got {kept}")
    keep = torch.zeros(batch, positions, depth, dtype=torch.bool)
    keep[..., :kept] = True
    return keep


def keep_rows(batch: int, grid: tuple[int, int], depth: int, rows: int) -> torch.Tensor:
    """Continue downward: every code of the first `rows` grid rows. -> keep (B, h*w, D)."""
    h, w = grid
    if not 0 <= rows <= h:
        raise InputError(f"the rows to keep must be in 0..{h} (the model's grid is {h}x{w}), got {rows}")
    keep = torch.zeros(batch, h, w, depth, dtype=torch.bool)
    keep[:, :rows] = True
    return keep.reshape(batch, h * w, depth)


def keep_frames(batch: int, given_frames: int, frames: int, grid: tuple[int, int], depth: int) -> torch.Tensor:
    """Extend a video: every code of the first `given_frames` of `frames`. -> keep (B, F*h*w, D)."""
    if not 0 <= given_frames <= frames:
        raise InputError(f"a video of {frames} frames cannot keep {given_frames} given frames")
    h, w = grid
    keep = torch.zeros(batch, frames, h * w, depth, dtype=torch.bool)
    keep[:, :given_frames] = True
    return keep.reshape(batch, frames * h * w, depth)


def repeat_sources(tensor: torch.Tensor, per_source: int) -> torch.Tensor:
    """Each source's entry `per_source` times in a row: (N, ...) -> (N * per_source, ...)."""
    if per_source < 1:
        raise InputError(f"edits per source must be at least 1, got {per_source}")
    return tensor.repeat_interleave(per_source, dim=0)


def match_batch(mask: torch.Tensor, sources: int) -> torch.Tensor:
    """One mask for every source, or one per source: (1 or N, ...) -> (N, ...)."""
    if mask.shape[0] == sources:
        return mask
    if mask.shape[0] == 1:
        return mask.expand(sources, *mask.shape[1:])
    raise InputError(f"{mask.shape[0]} masks for {sources} images: give one mask, or one per image")


def edits_of_sources(request: ImageRequest, given_codes: torch.Tensor, keep: torch.Tensor) -> EditRequest:
    """The one place an edit's `num_images` is read: N sources' given_codes (N, ...) and keep (N, P, D),
    each repeated num_images times in a row -> the run of all N * num_images edits."""
    per_source = request.num_images
    generation = replace(request, num_images=given_codes.shape[0] * per_source)
    return EditRequest(generation, repeat_sources(given_codes, per_source), repeat_sources(keep, per_source))


def edit_codes(
    model, request: ImageRequest | str, given_codes: torch.Tensor, keep: torch.Tensor, *,
    on_position: PositionCallback | None = None, on_compile: CompileCallback | None = None, **fields,
) -> torch.Tensor:
    """Regenerate the codes not kept, `num_images` edits of each of N sources: given_codes (N, h, w, D)
    with keep (N, P, D) -> codes (N * num_images, h, w, D), source after source.

    request: the generation, or a prompt with its fields as keywords."""
    model.check_codes(given_codes)
    edit = edits_of_sources(image_request(request, fields), given_codes, keep)
    return generate_codes(model, edit, on_position=on_position, on_compile=on_compile)


def extend_video_codes(
    model, request: ImageRequest | str, frame_codes: torch.Tensor, frames: int, *,
    on_position: PositionCallback | None = None, on_compile: CompileCallback | None = None, **fields,
) -> torch.Tensor:
    """frame_codes (Fg, h, w, D), the given frames of one video -> the request's `num_images` videos
    (B, frames, h, w, D) that start with exactly those frames and continue under its prompt."""
    model.check_codes(frame_codes)
    given_frames = frame_codes.shape[0]
    if frames <= given_frames:
        raise InputError(f"the video has {given_frames} frames already; ask for more than that in total, got {frames}")
    h, w, D = frame_codes.shape[1:]
    given = torch.zeros(1, frames, h, w, D, dtype=torch.long)  # (1, F, h, w, D): the one source video
    given[:, :given_frames] = frame_codes.cpu().long()
    keep = keep_frames(1, given_frames, frames, (h, w), D)
    edit = edits_of_sources(replace(image_request(request, fields), frames=frames), given, keep)
    return generate_codes(model, edit, on_position=on_position, on_compile=on_compile)


def model_view(model, images: torch.Tensor) -> torch.Tensor:
    """Images as the model sees them (its preprocessing: resized or padded to S x S), 0..1.
    (B, H, W, C) -> (B, S, S, 3): what paste_outside puts back."""
    pixels = model.preprocess(images).mul(0.5).add(0.5).clamp(0, 1)  # (B, 3, S, S)
    # preprocessing resamples in 8 bits: rounding gives back exactly k/255, as Load Image's values
    return pixels.mul(255).round().div(255).permute(0, 2, 3, 1).contiguous()


def feathered_pixel_mask(regenerate: torch.Tensor, size: int, feather: int) -> torch.Tensor:
    """Grid positions (B, h, w) bool -> pixel weights (B, S, S, 1) in 0..1: 1 inside the regenerated
    region, 0 outside, ramping across its edge over about 2 * feather pixels (a box blur applied twice)."""
    m = F.interpolate(regenerate[:, None].float(), size=(size, size), mode="nearest")  # (B, 1, S, S)
    if feather > 0:
        for _ in range(2):
            m = F.avg_pool2d(m, 2 * feather + 1, stride=1, padding=feather, count_include_pad=False)
    return m.permute(0, 2, 3, 1)


def paste_outside(original: torch.Tensor, edited: torch.Tensor, regenerate: torch.Tensor, feather: int) -> torch.Tensor:
    """The original pixels outside the regenerated positions, the edited ones inside, blended across
    a feathered edge (as ComfyUI's inpainting composites). original, edited (B, S, S, 3) -> (B, S, S, 3)."""
    if original.shape != edited.shape:
        raise InputError(f"cannot paste {tuple(original.shape)} pixels onto an edit of {tuple(edited.shape)}")
    if feather < 0:
        raise InputError(f"feather must be >= 0 pixels, got {feather}")
    weight = feathered_pixel_mask(regenerate.cpu(), edited.shape[1], feather)  # (B, S, S, 1)
    return edited.cpu() * weight + original.cpu() * (1 - weight)


@dataclass
class Inpainting(GeneratedImages):
    regenerated: torch.Tensor  # (B, S, S) float: 1 on the grid positions that were regenerated, 0 elsewhere


def inpaint(
    model, request: ImageRequest | str, codes: torch.Tensor, mask: torch.Tensor, *,
    images: torch.Tensor | None = None, threshold: float = DEFAULT_MASK_THRESHOLD, grow: int = 0,
    feather: int | None = DEFAULT_FEATHER, on_position: PositionCallback | None = None,
    on_compile: CompileCallback | None = None, **fields,
) -> Inpainting:
    """Regenerate the masked grid positions of N sources' codes (N, h, w, D) under the request,
    `num_images` edits of each (as edit_codes).

    mask (H, W), or (1 or N, H, W): 1 = regenerate, 0 = keep, any size; a grid position is regenerated
    when at least `threshold` of its pixels are masked, then the region grows by `grow` positions
    (regenerate_from_mask). images (N, H, W, C): the sources, when they were images: the mask maps
    onto them as the model's preprocessing maps the image (a latent's grid is the square), and
    unless `feather` is None their pixels as the model sees them (model_view) are pasted back
    outside the regenerated positions with a `feather`-pixel edge."""
    request = image_request(request, fields)
    aspect = model.config.image_aspect_ratio if images is not None else "resize"
    regenerate = regenerate_from_mask(match_batch(as_mask_batch(mask), codes.shape[0]), model.config.grid,
                                      aspect=aspect, threshold=threshold, grow=grow)  # (N, h, w)
    keep = keep_positions(regenerate, codes.shape[-1])
    edited = decode_images(model, edit_codes(model, request, codes, keep, on_position=on_position,
                                             on_compile=on_compile))
    regenerate = repeat_sources(regenerate, request.num_images)  # (B, h, w), as the edits
    if images is not None and feather is not None:
        original = repeat_sources(model_view(model, images), request.num_images)  # (B, S, S, 3)
        edited.images = paste_outside(original, edited.images, regenerate, feather)
    region = feathered_pixel_mask(regenerate, edited.images.shape[1], 0)[..., 0]  # (B, S, S)
    return Inpainting(**vars(edited), regenerated=region)


def vary_by_depth(model, request: ImageRequest | str, codes: torch.Tensor, kept_depths: int, *,
                  on_position: PositionCallback | None = None, on_compile: CompileCallback | None = None,
                  **fields) -> GeneratedImages:
    """Keep the first `kept_depths` residual depths of every position of N sources' codes (N, h, w, D),
    resample the rest: `num_images` variations of each. request: as edit_codes."""
    N, h, w, D = codes.shape
    keep = keep_depths(N, h * w, D, kept_depths)
    codes = edit_codes(model, request, codes, keep, on_position=on_position, on_compile=on_compile, **fields)
    return decode_images(model, codes)


def continue_downward(model, request: ImageRequest | str, codes: torch.Tensor, rows: int, *,
                      on_position: PositionCallback | None = None, on_compile: CompileCallback | None = None,
                      **fields) -> GeneratedImages:
    """Keep the first `rows` grid rows of N sources' codes (N, h, w, D), generate the rows below them:
    `num_images` continuations of each. request: as edit_codes."""
    N, h, w, D = codes.shape
    keep = keep_rows(N, (h, w), D, rows)
    codes = edit_codes(model, request, codes, keep, on_position=on_position, on_compile=on_compile, **fields)
    return decode_images(model, codes)


def extend_video(model, request: ImageRequest | str, frame_codes: torch.Tensor, frames: int, *,
                 on_position: PositionCallback | None = None, on_compile: CompileCallback | None = None,
                 **fields) -> GeneratedImages:
    """The given frames' codes (Fg, h, w, D) -> the request's `num_images` videos of `frames` frames
    starting with them, decoded: codes (B, F, h, w, D), features and frames (B, F, H, W, 3).
    request: as extend_video_codes."""
    codes = extend_video_codes(model, request, frame_codes, frames, on_position=on_position, on_compile=on_compile,
                               **fields)
    return decode_videos(model, codes)

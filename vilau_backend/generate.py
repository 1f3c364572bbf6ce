"""Text-to-image and text-to-video: the autoregressive code loop with classifier-free guidance.

The original (vila_u_arch.generate_image_content + its patched LlamaForCausalLM)
drives this through transformers' `generate`, sampling a text token at every
step that is then ignored (and that can derail the loop). Here the loop is
driven by the number of grid positions, in phases:

- `CodeStream.prefill`: the left-padded CFG batch (conditional rows, then
  unconditional rows) through the LLM into a KV cache allocated once for the
  whole run; the last hidden state of every row. When editing, the positions
  kept at the start (continue downward, extend a video) go through this same
  batched forward after the prompt.
- `CodeStream.step`: one LLM step for the embedding of the codes just chosen,
  written at a fixed cache index; returns the next hidden state.
- `generate_codes`: for every position, the depth transformer turns the hidden
  states into D codes under guidance; their summed embedding, through the
  projector, is the next LLM input. The text head is never run.

Editing (vilau_backend/editing.py) is one generalisation of this loop:
`given_codes` (B, P, D) and a boolean `keep` (B, P, D). A kept code is forced
in place of the sampled one inside the depth loop, so it feeds the next depth
step and the next LLM input exactly as a sampled code would; the random draw
of that (position, depth) is still made and discarded, so the codes sampled
elsewhere depend on the seed and not on what is kept.

A video is frames x h x w positions in one stream, frame after frame, as the
original. Randomness comes only from per-image generators derived from
(seed, image index), so image i is the same whatever the batch size.

Shapes: B images, R = 2B rows, T prompt length, L cache length, P positions,
D depth, H LLM hidden, C code width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .errors import InputError
from .llm import additive_mask, forward_hidden, new_static_cache, padded_positions
from .prompts import DEFAULT_NEGATIVE_PROMPT, cfg_batch
from .sampling import sample_codes, skip_draws

DEFAULT_VIDEO_FRAMES = 8  # as the original's GENERATION_VIDEO_FRAMES

# (positions done, positions in total, codes so far (B, done, D)); raising stops the run
PositionCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class ImageSampling:
    """Depth-code sampling; defaults are the values the original hard-codes.

    top_k=1 (or temperature 0) is exact greedy decoding."""

    cfg: float = 3.0
    temperature: float = 1.0
    top_k: int = 900
    top_p: float = 0.96

    def validate(self) -> None:
        for name in ("cfg", "temperature", "top_p"):
            value = getattr(self, name)
            if not math.isfinite(value):  # NaN passes every range check (and JSON can carry it)
                raise InputError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GeneratedImages:
    codes: torch.Tensor  # (B, h, w, D) int64, or (B, F, h, w, D) for a video
    features: torch.Tensor  # summed code embeddings (B, h, w, C) or (B, F, h, w, C)
    images: torch.Tensor | None  # ComfyUI IMAGE (B, H, W, 3) or frames (B, F, H, W, 3); None if not decoded


def image_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, index) through numpy's SeedSequence,
    so that neighbouring seeds do not give shifted copies of each other's batches."""
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    states = [np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint64)[0] for i in range(count)]
    return [torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in states]


class CodeStream:
    """One generation run: the CFG rows, their KV cache, attention masks and positions."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_positions: int):
        self.model = model
        device, dtype = model.device, model.dtype
        self.input_ids = input_ids.to(device)  # (R, T)
        self.rows, self.prompt_len = input_ids.shape
        self.length = self.prompt_len + n_positions  # L
        # keys a row may attend to: its real prompt tokens, then every generated position
        self.key_mask = torch.ones(self.rows, self.length, dtype=torch.bool, device=device)  # (R, L)
        self.key_mask[:, : self.prompt_len] = attention_mask.to(device)
        self.prompt_positions = padded_positions(self.key_mask[:, : self.prompt_len])  # (R, T)
        self.first_position = attention_mask.to(device).long().sum(-1, keepdim=True)  # (R, 1)
        self.key_index = torch.arange(self.length, device=device)  # (L,)
        self.cache = new_static_cache(model.llm, self.rows, self.length, dtype, device)

    def prefill(self, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """The prompts through the LLM, followed by `prefix` (R, n, H): the inputs of the first n
        positions when their codes are known (kept by an edit), all in one forward.

        Returns the last hidden state of every row (R, H): the state for position n."""
        embeds = self.model.llm.get_input_embeddings()(self.input_ids)  # (R, T, H)
        positions = self.prompt_positions  # (R, T)
        if prefix is not None and prefix.shape[1]:
            n = prefix.shape[1]
            embeds = torch.cat([embeds, prefix.to(embeds.dtype)], dim=1)  # (R, T + n, H)
            steps = torch.arange(n, device=positions.device)
            positions = torch.cat([positions, self.first_position + steps], dim=1)  # (R, T + n)
        T = embeds.shape[1]
        causal = self.key_index[None, :] <= torch.arange(T, device=self.key_index.device)[:, None]  # (T, L)
        allowed = self.key_mask[:, None, None, :] & causal[None, None]  # (R, 1, T, L)
        hidden = forward_hidden(
            self.model.llm, self.cache, inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
            position_ids=positions, cache_position=torch.arange(T, device=embeds.device),
        )
        return hidden[:, -1]

    def step(self, p: int, embed: torch.Tensor) -> torch.Tensor:
        """Feed the embedding of position p's codes (R, H); returns the hidden state for position p+1 (R, H)."""
        index = self.prompt_len + p  # cache index of this input
        allowed = (self.key_mask & (self.key_index <= index))[:, None, None, :]  # (R, 1, 1, L)
        hidden = forward_hidden(
            self.model.llm, self.cache, inputs_embeds=embed[:, None, :], attention_mask=additive_mask(allowed, embed.dtype),
            position_ids=self.first_position + p, cache_position=self.key_index[index : index + 1],
        )
        return hidden[:, -1]


def _next_input(model, position_codes: torch.Tensor) -> torch.Tensor:
    """The LLM input after a position: the projected sum of its code embeddings, for both CFG halves.

    Computed with the original's exact ops and shapes (a cumsum over depth, then the projector
    on the non-contiguous (R, 1, C) slice): on such a slice torch's Linear rounds the matmul
    before adding the bias, and in bf16 that single rounding step moves about a fifth of the
    values by an ulp, enough to flip near-tied codes later on."""
    rows = position_codes.repeat(2, 1)[:, None, :]  # (R, 1, D): both halves continue from the same codes
    sums = torch.cumsum(model.vision.quantizer.embed_codes(rows), dim=-2)[:, :, -1, :]  # (R, 1, C)
    return model.projector(sums)[:, 0]  # (R, H)


def _prefix_inputs(model, prefix_codes: torch.Tensor) -> torch.Tensor:
    """The LLM inputs of several known positions at once: codes (B, n, D) -> (R, n, H),
    the same projected code sums `_next_input` makes one position at a time."""
    rows = prefix_codes.repeat(2, 1, 1)  # (R, n, D)
    sums = torch.cumsum(model.vision.quantizer.embed_codes(rows), dim=-2)[:, :, -1, :]  # (R, n, C)
    return model.projector(sums)  # (R, n, H)


def _check_request(model, prompt: str, num_images: int, frames: int | None, sampling: ImageSampling) -> None:
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty: describe the image or video to generate")
    if num_images < 1:
        raise InputError(f"num_images must be at least 1, got {num_images}")
    if frames is not None and frames < 1:
        raise InputError(f"frames must be at least 1, got {frames}")
    sampling.validate()


@torch.inference_mode()
def generate_codes(
    model,
    prompt: str,
    *,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    num_images: int = 1,
    frames: int | None = None,
    sampling: ImageSampling = ImageSampling(),
    seed: int = 0,
    on_position: PositionCallback | None = None,
    given_codes: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate the codes of `num_images` images (frames=None) or videos of `frames` frames.

    Editing: `given_codes` and `keep`, both (B, P, D) (or the shape of the result), make every
    kept code the given one and sample the others; see vilau_backend/editing.py for the masks.
    Positions kept entirely at the start of every image go through one batched prefill.

    Returns codes (B, h, w, D), or (B, F, h, w, D) for a video, int64 on the model's device."""
    _check_request(model, prompt, num_images, frames, sampling)
    video = frames is not None
    h, w = model.config.grid
    D = model.config.quantizer.depth
    P = (frames or 1) * h * w
    edit = _edit_inputs(model, given_codes, keep, (num_images, P, D))
    input_ids, attention_mask = cfg_batch(model.tokenizer, prompt, negative_prompt, n=num_images, video=video)
    total = input_ids.shape[1] + P
    if total > model.config.llm.context_length:
        # the CFG batch is as long as the longer of the prompt and the negative prompt: name that one
        lengths = attention_mask.sum(-1)  # (R,): conditional rows, then unconditional rows
        negative = int(lengths[num_images:].max()) > int(lengths[:num_images].max())
        which = "negative prompt" if negative else "prompt"
        raise InputError(
            f"{which} ({input_ids.shape[1]} tokens) plus {P} image positions exceeds the model's context of "
            f"{model.config.llm.context_length}; shorten the {which} or generate fewer frames"
        )
    stream = CodeStream(model, input_ids, attention_mask, P)
    codes = _code_loop(model, stream, sampling, image_generators(seed, num_images), edit, on_position)
    if video:
        return codes.reshape(num_images, frames, h, w, D)
    return codes.reshape(num_images, h, w, D)


@dataclass(frozen=True)
class _Edit:
    given: torch.Tensor  # (B, P, D) int64: the codes to force where kept (anything elsewhere)
    keep: torch.Tensor  # (B, P, D) bool
    prefix: int  # leading positions kept at every depth in every image: prefilled, not stepped


def _edit_inputs(model, given_codes, keep, shape: tuple[int, int, int]) -> _Edit | None:
    """Check and flatten the edit arguments to (B, P, D); None when nothing is edited."""
    if given_codes is None and keep is None:
        return None
    if given_codes is None or keep is None:
        raise InputError("editing needs both given_codes and keep (which of the given codes to keep)")
    B, P, D = shape
    for name, tensor in (("given_codes", given_codes), ("keep", keep)):
        if tensor.numel() != B * P * D or tensor.shape[0] != B or tensor.shape[-1] != D:
            raise InputError(
                f"{name} must hold {B} x {P} positions x {D} depths (shaped (B, P, D) or as the generated codes), "
                f"got shape {tuple(tensor.shape)}"
            )
    if keep.dtype != torch.bool:
        raise InputError(f"keep must be a bool tensor (True = keep the given code), got {keep.dtype}")
    device = model.device
    given = given_codes.reshape(B, P, D).to(device=device, dtype=torch.long)
    keep = keep.reshape(B, P, D).to(device)
    n_embed = model.config.quantizer.n_embed
    kept_values = given[keep]
    if kept_values.numel() and (int(kept_values.min()) < 0 or int(kept_values.max()) >= n_embed):
        raise InputError(f"kept codes must lie in 0..{n_embed - 1}, found {int(kept_values.min())}..{int(kept_values.max())}; "
                         "were they made by another model?")
    whole = keep.all(dim=-1).all(dim=0)  # (P,): positions kept entirely in every image
    prefix = int(whole.long().cumprod(0).sum())
    return _Edit(given=given, keep=keep, prefix=prefix)


def _code_loop(
    model, stream: CodeStream, sampling: ImageSampling, generators: list[torch.Generator], edit: _Edit | None,
    on_position: PositionCallback | None,
) -> torch.Tensor:
    """Prefill (with any kept prefix), then one depth loop and one LLM step per position. -> (B, P, D)"""
    B, P = stream.rows // 2, stream.length - stream.prompt_len
    D = model.config.quantizer.depth
    sample = partial(
        sample_codes, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        generators=generators,
    )
    codes = torch.zeros(B, P, D, dtype=torch.long, device=model.device)  # (B, P, D)
    start = 0 if edit is None else edit.prefix
    if start:
        codes[:, :start] = edit.given[:, :start]
        # the prefix's draws are skipped, not saved: later positions draw what they would stepping through
        skip_draws(generators, start * D, temperature=sampling.temperature, top_k=sampling.top_k)
        if on_position is not None:
            on_position(start, P, codes[:, :start])
        if start == P:
            return codes
    hidden = stream.prefill(_prefix_inputs(model, codes[:, :start]) if start else None)  # (R, H)
    embed_codes = model.vision.quantizer.embed_codes
    for p in range(start, P):
        forced = {} if edit is None else dict(given=edit.given[:, p], keep=edit.keep[:, p])
        position_codes, _ = model.vision.depth.generate(hidden, embed_codes, sampling.cfg, sample, **forced)  # (B, D)
        codes[:, p] = position_codes
        if on_position is not None:
            on_position(p + 1, P, codes[:, : p + 1])
        if p + 1 < P:
            hidden = stream.step(p, _next_input(model, position_codes))  # (R, H)
    return codes


def generate_images(model, prompt: str, *, decode: bool = True, **options) -> GeneratedImages:
    """Text to image: codes, summed features and decoded images (conditional rows only)."""
    if options.get("frames") is not None:
        raise InputError("generate_images makes still images; use generate_video for frames")
    codes = generate_codes(model, prompt, **options)
    features = model.codes_to_features(codes)  # (B, h, w, C)
    images = model.decode_features(features) if decode else None
    return GeneratedImages(codes=codes.cpu(), features=features.cpu(), images=images)


def generate_video(model, prompt: str, *, frames: int = DEFAULT_VIDEO_FRAMES, decode: bool = True, **options) -> GeneratedImages:
    """Text to video: codes (B, F, h, w, D), features and frames (B, F, H, W, 3)."""
    return decode_videos(model, generate_codes(model, prompt, frames=frames, **options), decode=decode)


def decode_videos(model, codes: torch.Tensor, decode: bool = True) -> GeneratedImages:
    """codes (B, F, h, w, D) -> codes, features (B, F, h, w, C) and frames (B, F, H, W, 3), a video at a time."""
    B, F = codes.shape[:2]
    features = model.codes_to_features(codes.flatten(0, 1))  # (B*F, h, w, C)
    images = None
    if decode:
        decoded = torch.cat([model.decode_features(features[i : i + F]) for i in range(0, B * F, F)])
        images = decoded.reshape(B, F, *decoded.shape[1:])
    return GeneratedImages(codes=codes.cpu(), features=features.reshape(B, F, *features.shape[1:]).cpu(), images=images)


@torch.inference_mode()
def preview_image(model, codes: torch.Tensor, total_positions: int, grey: float = 0.5) -> torch.Tensor:
    """Decode a partially generated grid for a progress preview.

    codes (B, done, D) in raster order; positions not yet generated are decoded
    from zero features and then painted flat grey, so the preview shows exactly
    the rows that exist. Returns (B, H, W, 3) float 0..1 of the frame being generated."""
    h, w = model.config.grid
    B, done, D = codes.shape
    per_frame = h * w
    frame_start = ((done - 1) // per_frame) * per_frame if done else 0
    in_frame = codes[:, frame_start:done]  # (B, n, D)
    n = in_frame.shape[1]
    grid_codes = torch.zeros(B, per_frame, D, dtype=torch.long, device=codes.device)
    grid_codes[:, :n] = in_frame
    features = model.codes_to_features(grid_codes.reshape(B, h, w, D))
    valid = (torch.arange(per_frame, device=features.device) < n).reshape(1, h, w, 1)
    images = model.decode_features(features * valid.to(features.dtype))  # (B, H, W, 3)
    H, W = images.shape[1:3]
    pixel_valid = torch.nn.functional.interpolate(valid.permute(0, 3, 1, 2).float(), size=(H, W), mode="nearest")
    pixel_valid = pixel_valid.permute(0, 2, 3, 1).cpu()  # (1, H, W, 1)
    return images * pixel_valid + grey * (1 - pixel_valid)

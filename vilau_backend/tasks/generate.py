"""Text-to-image and text-to-video: the autoregressive code loop with classifier-free guidance.

The original (vila_u_arch.generate_image_content + its patched LlamaForCausalLM)
drives this through transformers' `generate`, sampling a text token at every
step that is then ignored (and that can derail the loop). Here the loop is
driven by the number of grid positions, in phases (decoding/position_step.py):

- `PositionState.prefill`: the left-padded CFG batch (conditional rows, then
  unconditional rows) through the LLM into a KV cache allocated once; the
  last hidden state of every row. When editing, the positions kept at the
  start (continue downward, extend a video) go through this same batched
  forward after the prompt.
- `advance`: one grid position as one fixed-shape step: the depth transformer
  turns the hidden states into D codes under guidance, and their summed
  embedding, through the projector, is the next LLM input, written at a fixed
  cache index. The text head is never run. With `compile` the step is
  compiled once per (rows, cache-length bucket) and replayed.
- `generate_codes`: the loop over positions, with the progress callback.

Editing (vilau_backend/tasks/editing.py) is one generalisation of this loop:
an `EditRequest` (requests.py): `given_codes` (B, P, D) and a boolean `keep` (B, P, D). A kept code is forced
in place of the sampled one inside the depth loop, so it feeds the next depth
step and the next LLM input exactly as a sampled code would; the random draw
of that (position, depth) is still made and discarded, so the codes sampled
elsewhere depend on the seed and not on what is kept.

A video is frames x h x w positions in one stream, frame after frame, as the
original. Randomness comes only from per-image generators derived from
(seed, image index), drawn up front as (B, P, D) uniforms, so image i is the
same whatever the batch size, and compiled and eager runs draw the same numbers.

Shapes: B images, R = 2B rows, T prompt length, L cache length, P positions,
D depth, H LLM hidden, C code width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..decoding import compiled_steps, position_step
from ..decoding.compile_choice import CompiledStepFailed
from ..decoding.compiled_steps import CompileCallback
from ..errors import InputError
from ..decoding.prompts import cfg_batch, refuse_text_that_cannot_fit
from ..memory import working_memory
from ..decoding.sampling import draw_uniforms
from .requests import EditRequest, ImageRequest, ImageSampling, empty_prompt_problem, image_request

__all__ = [  # ImageSampling and empty_prompt_problem are imported from here too
    "DEFAULT_VIDEO_FRAMES", "GeneratedImages", "ImageRequest", "ImageSampling", "decode_videos", "empty_prompt_problem",
    "generate_codes", "generate_images", "generate_video", "image_generators", "preview_image",
]

DEFAULT_VIDEO_FRAMES = 8  # as the original's GENERATION_VIDEO_FRAMES

# (positions done, positions in total, codes so far (B, done, D)); raising stops the run
PositionCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class GeneratedImages:
    codes: torch.Tensor  # (B, h, w, D) int64, or (B, F, h, w, D) for a video
    features: torch.Tensor  # summed code embeddings (B, h, w, C) or (B, F, h, w, C)
    images: torch.Tensor | None  # ComfyUI IMAGE (B, H, W, 3) or frames (B, F, H, W, 3); None if not decoded


def image_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, index) through numpy's SeedSequence,
    so that neighbouring seeds do not give shifted copies of each other's batches (seed >= 0:
    ImageRequest checks it)."""
    states = [np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint64)[0] for i in range(count)]
    return [torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in states]


def _check_request(model, request: ImageRequest) -> None:
    """What only the model can tell: whether the prompts fit its context (the request checked the rest)."""
    refuse_text_that_cannot_fit(model.tokenizer, {"prompt": request.prompt, "negative prompt": request.negative_prompt},
                                model.config.llm.context_length)


def code_request(request: ImageRequest | EditRequest | str | None, fields: dict, given_codes=None, keep=None):
    """The request generate_codes was given, or the one a prompt, the request's fields as keywords and
    an edit's given_codes and keep make."""
    if isinstance(request, EditRequest):
        if fields or given_codes is not None or keep is not None:
            raise TypeError("pass an EditRequest or a prompt with keywords, not both")
        return request
    generation = image_request(request, fields)
    if given_codes is None and keep is None:
        return generation
    return EditRequest(generation, given_codes, keep)


@torch.inference_mode()
def generate_codes(
    model,
    request: ImageRequest | EditRequest | str | None = None,
    *,
    on_position: PositionCallback | None = None,
    on_compile: CompileCallback | None = None,
    given_codes: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    **fields,
) -> torch.Tensor:
    """Generate the codes of `num_images` images (frames None) or videos of `frames` frames.

    request: an ImageRequest, an EditRequest, or a prompt with the ImageRequest's fields (and an
    edit's given_codes and keep) as keywords. Editing: every kept code is the given one, the others
    are sampled; see vilau_backend/tasks/editing.py for the masks. Positions kept entirely at the
    start of every image go through one batched prefill.

    Compiled and eager runs draw the same numbers; their codes can differ only where their kernels'
    rounding flips a near-tie. `on_compile` is called before a run that compiles, and with a notice
    when compiling failed and the run finished eager.

    Returns codes (B, h, w, D), or (B, F, h, w, D) for a video, int64 on the model's device."""
    request = code_request(request, fields, given_codes, keep)
    given_codes, keep = (request.given_codes, request.keep) if isinstance(request, EditRequest) else (None, None)
    request = request.generation if isinstance(request, EditRequest) else request
    _check_request(model, request)
    B, frames = request.num_images, request.frames
    h, w = model.config.grid
    D = model.config.quantizer.depth
    P = (frames or 1) * h * w
    edit = _edit_inputs(model, given_codes, keep, (B, P, D))
    input_ids, attention_mask = cfg_batch(model.tokenizer, request.prompt, request.negative_prompt, n=B,
                                          video=frames is not None)
    _check_context(model, input_ids, attention_mask, B, P)
    compile = compiled_steps.run_compiles(model, request.compile)
    uniforms = draw_uniforms(image_generators(request.seed, B), P, D).to(model.device)  # (B, P, D), once
    run = _CodeRun(input_ids, attention_mask.to(model.device), uniforms, request.sampling, edit)
    codes = _run_codes(model, run, compile, on_position, on_compile)
    if frames is not None:
        return codes.reshape(B, frames, h, w, D)
    return codes.reshape(B, h, w, D)


def _check_context(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, B: int, P: int) -> None:
    """Refuse a CFG batch (R, T) whose prompt plus P positions is longer than the model's context."""
    if input_ids.shape[1] + P <= model.config.llm.context_length:
        return
    # the CFG batch is as long as the longer of the prompt and the negative prompt: name that one
    lengths = attention_mask.sum(-1)  # (R,): conditional rows, then unconditional rows
    negative = int(lengths[B:].max()) > int(lengths[:B].max())
    which = "negative prompt" if negative else "prompt"
    raise InputError(
        f"{which} ({input_ids.shape[1]} tokens) plus {P} image positions exceeds the model's context of "
        f"{model.config.llm.context_length}; shorten the {which} or generate fewer frames"
    )


@dataclass(frozen=True)
class _CodeRun:
    """One run's inputs, as `PositionState.begin` takes them."""

    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T) on the model's device
    uniforms: torch.Tensor  # (B, P, D) float32
    sampling: ImageSampling
    edit: _Edit | None


def _run_codes(model, run: _CodeRun, compile: bool, on_position: PositionCallback | None,
               on_compile: CompileCallback | None) -> torch.Tensor:
    """The run's codes (B, P, D). A run whose compiled step fails starts again eager, which gives
    the codes an eager run gives; later runs of the model stay eager (decoding/compile_choice.py)."""
    try:
        return _run_codes_once(model, run, compile, on_position, on_compile)
    except CompiledStepFailed:  # the model fell back to eager (compiled_steps.StepCalls)
        return _run_codes_once(model, run, False, on_position, on_compile)


def _run_codes_once(model, run: _CodeRun, compile: bool, on_position: PositionCallback | None,
                    on_compile: CompileCallback | None) -> torch.Tensor:
    P = run.uniforms.shape[1]
    key = compiled_steps.step_key(model, run.input_ids.shape[0], compiled_steps.cache_length(run.input_ids.shape[1], P))
    _reserve_working_memory(model, run, key, compile)
    state = compiled_steps.step_state(model, key, compile, position_step.PositionState)
    forced = {} if run.edit is None else dict(given=run.edit.given, keep=run.edit.keep)
    state.begin(run.input_ids, run.attention_mask, run.uniforms, run.sampling, **forced)
    return _code_loop(model, state, P, 0 if run.edit is None else run.edit.prefix, compile, on_position, on_compile)


def _reserve_working_memory(model, run: _CodeRun, key, compile: bool) -> None:
    """Ask for the run's working memory before allocating it; InputError when it cannot fit."""
    R, T = run.input_ids.shape
    B, P = R // 2, run.uniforms.shape[1]
    frames = P // (model.config.grid[0] * model.config.grid[1])
    size = model.config.image_size
    what = f"{B} image(s) at {size} px" if frames == 1 else f"{B} video(s) of {frames} frames at {size} px"
    memory = working_memory.generation_memory(model, B, T, key.length, kept=compile)
    remedy = "lower batch_size (--num on the command line)" + (" or frames" if frames > 1 else "")
    working_memory.reserve_for_run(model, key, memory, what, remedy)


@dataclass(frozen=True)
class _Edit:
    given: torch.Tensor  # (B, P, D) int64: the codes to force where kept (anything elsewhere)
    keep: torch.Tensor  # (B, P, D) bool
    prefix: int  # leading positions kept at every depth in every image: prefilled, not stepped


def _edit_inputs(model, given_codes: torch.Tensor | None, keep: torch.Tensor | None,
                 shape: tuple[int, int, int]) -> _Edit | None:
    """Check an edit's tensors (as EditRequest holds them) against the run and flatten them to (B, P, D);
    None when nothing is edited."""
    if given_codes is None or keep is None:
        return None
    B, P, D = shape
    for name, tensor in (("given_codes", given_codes), ("keep", keep)):
        if tensor.numel() != B * P * D or tensor.shape[0] != B or tensor.shape[-1] != D:
            raise InputError(
                f"{name} must hold {B} x {P} positions x {D} depths (shaped (B, P, D) or as the generated codes), "
                f"got shape {tuple(tensor.shape)}"
            )
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
    model, state, P: int, start: int, compile: bool, on_position: PositionCallback | None,
    on_compile: CompileCallback | None,
) -> torch.Tensor:
    """Prefill (with the first `start` positions when an edit keeps them whole), then one step
    per position. Their uniforms are simply not read: later positions draw what they would
    stepping through. Returns codes (B, P, D)."""
    if start:
        state.codes[:, :start] = state.given[:, :start]
        if on_position is not None:
            on_position(start, P, state.codes[:, :start])
        if start == P:
            return state.codes[:, :P].clone()
    step = compiled_steps.StepCalls(model, state.key, position_step.advance, compile, on_compile)
    state.prefill(model, position_step.code_inputs(model, state.codes[:, :start]) if start else None)
    for p in range(start, P):
        step(model, state, state.grid_indices[p])
        if on_position is not None:
            on_position(p + 1, P, state.codes[:, : p + 1])  # a view: later steps write beyond it
    return state.codes[:, :P].clone()


def generate_images(
    model, request: ImageRequest | str, *, decode: bool = True, on_position: PositionCallback | None = None,
    on_compile: CompileCallback | None = None, **fields,
) -> GeneratedImages:
    """Text to image: codes, summed features and decoded images (conditional rows only).
    request: an ImageRequest, or a prompt with its fields as keywords."""
    request = image_request(request, fields)
    if request.frames is not None:
        raise InputError("generate_images makes still images; use generate_video for frames")
    codes = generate_codes(model, request, on_position=on_position, on_compile=on_compile)
    return decode_images(model, codes, decode=decode)


def generate_video(
    model, request: ImageRequest | str, *, decode: bool = True, on_position: PositionCallback | None = None,
    on_compile: CompileCallback | None = None, **fields,
) -> GeneratedImages:
    """Text to video: codes (B, F, h, w, D), features and frames (B, F, H, W, 3).
    request: an ImageRequest with frames, or a prompt with its fields as keywords (frames by default
    DEFAULT_VIDEO_FRAMES)."""
    if isinstance(request, str):
        fields = {"frames": DEFAULT_VIDEO_FRAMES, **fields}
    request = image_request(request, fields)
    if request.frames is None:
        raise InputError("generate_video makes videos: give frames (1 or more), or use generate_images")
    codes = generate_codes(model, request, on_position=on_position, on_compile=on_compile)
    return decode_videos(model, codes, decode=decode)


def decode_images(model, codes: torch.Tensor, decode: bool = True) -> GeneratedImages:
    """codes (B, h, w, D) -> codes, summed features (B, h, w, C) and images (B, H, W, 3)."""
    features = model.codes_to_features(codes)  # (B, h, w, C)
    images = model.decode_features(features) if decode else None
    return GeneratedImages(codes=codes.cpu(), features=features.cpu(), images=images)


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
def preview_image(model, codes: torch.Tensor, grey: float = 0.5) -> torch.Tensor:
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

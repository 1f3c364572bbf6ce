"""Image and video understanding: VILA-U answers a question about images or a video.

As the original's ``generate_content`` (``vila_u/model/vila_u_arch.py``):

- the prompt is the vicuna_v1 conversation with one ``<image>`` slot per image
  or video frame (:func:`vilau_backend.prompts.understanding_prompt`), tokenized
  chunk-wise with ``IMAGE_TOKEN_INDEX`` (-200) at each slot;
- each image is encoded by the vision tower; its quantized features z_q,
  reshaped to (h*w, C) and projected into the LLM, replace its slot
  (``prepare_inputs_labels_for_multimodal``; text ids are embedded as usual);
- the LLM answers from those embeddings until EOS or ``max_new_tokens``; the
  text is ``decode(new ids, skip_special_tokens=True).strip()``.

The generation loop is our own rather than ``llm.generate`` so that sampling
draws only from a ``torch.Generator`` seeded by the caller (``generate`` uses
the global RNG) and a per-token callback can stream and cancel: the prompt is
prefilled once into a ``DynamicCache``, then one token per step. Logits are
processed with transformers' own processors, in ``generate``'s order:
repetition penalty, then (when sampling) temperature, top-k, top-p.

Differences from the original, all deliberate:

- ``output_ids`` hold only generated tokens; transformers 4.36 prepended a
  dummy BOS when generating from embeddings.
- The repetition penalty sees the generated tokens only, as ``generate`` does
  when given embeddings (the prompt's ids are not visible to it).
- A prompt plus ``max_new_tokens`` longer than the LLM's context
  (``config.llm.context_length``: max_position_embeddings x the linear RoPE
  factor, capped by tokenizer_model_max_length; 8192 for the published models)
  is an error; the original silently truncated the prompt.
- ``max_new_tokens`` defaults to 512. The original's ``max_length`` 4096 let an
  answer run to 4095 tokens.

Shapes: N images in one prompt, P grid positions per image (h*w), C vision
width, T prompt positions (text tokens + N*P image features), H LLM hidden,
V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .llm import forward_hidden, new_dynamic_cache
from .prompts import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, understanding_prompt
from .video import uniform_frame_indices

if TYPE_CHECKING:
    from .model import VilaUModel

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512

# on_token(step, token_id, text_so_far): step counts from 0 within one answer
TokenCallback = Callable[[int, int, str], object]


@dataclass(frozen=True)
class TextSampling:
    """How the next token is chosen. The defaults are the original's inference defaults
    (the published llm/generation_config.json: do_sample, temperature 0.9, top_p 0.6;
    top_k 50 is transformers' default). ``do_sample=False`` is greedy (argmax); the
    repetition penalty applies to both, as in transformers."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50  # 0 disables
    top_p: float = 0.6  # 1.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise InputError(
                f"temperature must be above 0 when sampling, got {self.temperature}; use greedy decoding instead"
            )
        if self.top_k < 0:
            raise InputError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InputError(f"top_p must lie in 0..1, got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be above 0 (1.0 is off), got {self.repetition_penalty}")


GREEDY = TextSampling(do_sample=False)


@dataclass(frozen=True)
class Answer:
    text: str
    input_ids: list[int]  # the prompt, IMAGE_TOKEN_INDEX at each image slot
    output_ids: list[int]  # generated tokens; ends with EOS when the model stopped by itself


# ---- public API ------------------------------------------------------------------------


def describe_images(
    model: VilaUModel,
    images: torch.Tensor | Sequence[torch.Tensor],
    query: str,
    *,
    batch: bool = False,
    sampling: TextSampling = TextSampling(),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    on_token: TokenCallback | None = None,
) -> list[Answer]:
    """Answer `query` about images: ComfyUI IMAGE (B, H, W, C) float 0..1, or a list of such
    batches (each may have its own size).

    ``batch=False``: all images go into one prompt, in order, and one answer comes back
    (the original's ``generate_content([img1, img2, query])``). ``batch=True``: every image
    is its own prompt and gets its own answer, in input order.

    Batched answers are computed one image after another, each exactly as if it were
    described alone (vision encoding included): that makes them bit-identical to single
    answers on any device, which a padded batch cannot promise (other kernel shapes,
    other roundings, flipped near-ties). Each answer samples from its own generator
    seeded with `seed`. `on_token` is called for every token of every answer, in order.
    """
    _check_query(query)
    pixels = _pixel_values(model, images)  # (N, 3, S, S)
    if not batch:
        return [_answer_about(model, pixels, query, sampling, max_new_tokens, seed, on_token)]
    return [
        _answer_about(model, pixels[i : i + 1], query, sampling, max_new_tokens, seed, on_token)
        for i in range(pixels.shape[0])
    ]


def describe_video(
    model: VilaUModel,
    frames: torch.Tensor,
    query: str,
    *,
    sampling: TextSampling = TextSampling(),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    on_token: TokenCallback | None = None,
) -> Answer:
    """Answer `query` about a video: frames (F, H, W, C) float 0..1, sampled evenly to the
    model's ``num_video_frames`` (all of them when there are fewer)."""
    _check_query(query)
    frames, _ = sample_video_frames(frames, model.config.num_video_frames)
    return _answer_about(model, model.preprocess(frames), query, sampling, max_new_tokens, seed, on_token)


def sample_video_frames(frames: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, list[int]]:
    """(F, H, W, C) -> (min(F, num_frames), H, W, C) evenly spaced frames and their indices."""
    if frames.ndim != 4:
        raise InputError(f"video frames must be shaped (frames, height, width, channels), got {tuple(frames.shape)}")
    n = frames.shape[0]
    indices = uniform_frame_indices(n, num_frames)
    if n < num_frames:
        log.warning("the video has %d frames, fewer than the %d this model takes; using all %d", n, num_frames, n)
    return frames[indices], indices


# ---- one prompt ------------------------------------------------------------------------


def _answer_about(
    model: VilaUModel,
    pixels: torch.Tensor,
    query: str,
    sampling: TextSampling,
    max_new_tokens: int,
    seed: int,
    on_token: TokenCallback | None,
) -> Answer:
    """pixels (N, 3, S, S) -> one answer to a prompt with N image slots."""
    n_images = pixels.shape[0]
    input_ids = model.tokenizer.tokenize_with_image_slots(understanding_prompt(query, n_images))
    _check_context(model, input_ids, max_new_tokens)
    z_q = model.encode_pixels(pixels).z_q  # (N, h, w, C)
    # as the original: understanding feeds the quantizer's z_q (not the code-embedding sum)
    image_embeds = model.project(z_q.reshape(n_images, -1, z_q.shape[-1]))  # (N, P, H)
    generator = _seeded_generator(seed)
    with torch.inference_mode():
        inputs_embeds = splice_image_embeddings(model, input_ids, image_embeds)  # (T, H)
        output_ids = generate_text(
            model, inputs_embeds, sampling=sampling, max_new_tokens=max_new_tokens, generator=generator,
            on_token=on_token,
        )
    return Answer(text=_answer_text(model, output_ids), input_ids=input_ids, output_ids=output_ids)


@torch.inference_mode()
def splice_image_embeddings(model: VilaUModel, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
    """Prompt ids with N image slots + image_embeds (N, P, H) -> inputs_embeds (T, H), T = len(ids) - N + N*P."""
    slots = [i for i, token in enumerate(input_ids) if token == IMAGE_TOKEN_INDEX]
    if len(slots) != image_embeds.shape[0]:
        raise InputError(f"the prompt has {len(slots)} image slots but {image_embeds.shape[0]} images were given")
    ids = torch.tensor(input_ids, device=model.device).clamp(min=0)  # slots embedded as id 0, then replaced
    text_embeds = model.llm.get_input_embeddings()(ids)  # (len(ids), H)
    pieces, start = [], 0
    for slot, features in zip(slots, image_embeds):
        pieces += [text_embeds[start:slot], features.to(text_embeds.dtype)]
        start = slot + 1
    pieces.append(text_embeds[start:])
    return torch.cat(pieces)


# ---- the token loop --------------------------------------------------------------------


@torch.inference_mode()
def generate_text(
    model,
    inputs_embeds: torch.Tensor,
    *,
    sampling: TextSampling = GREEDY,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    generator: torch.Generator | None = None,
    on_token: TokenCallback | None = None,
) -> list[int]:
    """inputs_embeds (T, H) -> new token ids, ending at EOS or after max_new_tokens.

    The cache lives only in this call: if `on_token` raises, the model is left as it was."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be 1 or more, got {max_new_tokens}")
    if sampling.do_sample and generator is None:
        raise InputError("sampling needs a torch.Generator; pass a seeded one (or use greedy decoding)")
    eos = model.tokenizer.eos_token_id
    processors = _logits_processors(sampling)
    cache = new_dynamic_cache(model.llm)
    logits = prefill(model.llm, inputs_embeds, cache)  # (1, V)
    prompt_length = inputs_embeds.shape[0]
    generated: list[int] = []
    for step in range(max_new_tokens):
        token = next_token(logits, generated, processors, sampling.do_sample, generator)
        generated.append(token)
        if on_token is not None:
            _report(on_token, step, token, model, generated)
        if token == eos or step == max_new_tokens - 1:
            break
        logits = decode_step(model.llm, token, prompt_length + step, cache)
    return generated


def prefill(llm, inputs_embeds: torch.Tensor, cache) -> torch.Tensor:
    """Run the whole prompt (T, H) into `cache`; logits at its last position (1, V) float32."""
    hidden = forward_hidden(llm, cache, inputs_embeds=inputs_embeds.unsqueeze(0))  # (1, T, H)
    # as the original: logits = lm_head(hidden).float(), only the last position is needed
    return llm.lm_head(hidden[:, -1]).float()


def decode_step(llm, token: int, position: int, cache) -> torch.Tensor:
    """Feed one token at `position` (0-based, counting image features) -> next logits (1, V) float32."""
    device = llm.lm_head.weight.device
    hidden = forward_hidden(
        llm,
        cache,
        input_ids=torch.tensor([[token]], device=device),
        position_ids=torch.tensor([[position]], device=device),
    )  # (1, 1, H)
    return llm.lm_head(hidden[:, -1]).float()


def next_token(logits: torch.Tensor, generated: list[int], processors, do_sample: bool, generator) -> int:
    """logits (1, V) float32 -> the chosen token id."""
    # the processors see the generated ids only, as `generate` does when given embeddings
    seen = torch.tensor([generated], dtype=torch.long, device=logits.device)  # (1, n)
    scores = processors(seen, logits)  # (1, V)
    if not do_sample:
        return int(scores.argmax(dim=-1))
    # drawn on the CPU: the same seed picks the same token on any device
    probs = torch.softmax(scores, dim=-1).cpu()  # (1, V)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def _logits_processors(sampling: TextSampling):
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    # the conditions under which transformers' generate adds each processor
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.do_sample:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k != 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


def _report(on_token: TokenCallback, step: int, token: int, model, generated: list[int]) -> None:
    # the whole answer is decoded again each step (bytes of one character span tokens);
    # cheap next to an LLM step, and only done when someone listens. Whatever the callback
    # raises ends the answer and reaches the caller unchanged (ComfyUI's interrupt included);
    # nothing outlives the call but the model's weights, so the next call starts clean.
    on_token(step, token, _answer_text(model, generated))


# ---- checks and small helpers ----------------------------------------------------------


def _answer_text(model, output_ids: list[int]) -> str:
    # as the original: decode(ids, skip_special_tokens=True).strip()
    return model.tokenizer.decode(output_ids, skip_special_tokens=True).strip()


def _seeded_generator(seed: int) -> torch.Generator:
    # a CPU generator: tokens are drawn on the CPU (see next_token)
    if not 0 <= seed < 2**64:
        raise InputError(f"seed must lie in 0..2**64-1, got {seed}")
    return torch.Generator(device="cpu").manual_seed(seed)


def _check_query(query: str) -> None:
    if not isinstance(query, str):
        raise InputError(f"the question must be text, got {type(query).__name__}")
    if IMAGE_PLACEHOLDER in query:
        # the slot would have no image to fill it
        raise InputError(
            f"the question contains '{IMAGE_PLACEHOLDER}', which VILA-U reserves for image inputs; remove it"
        )


def _check_context(model, input_ids: list[int], max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be 1 or more, got {max_new_tokens}")
    n_images = input_ids.count(IMAGE_TOKEN_INDEX)
    n_text = len(input_ids) - n_images
    prompt = n_text + n_images * model.config.tokens_per_image
    limit = model.config.llm.context_length
    if prompt + max_new_tokens > limit:
        raise InputError(
            f"the prompt takes {prompt} positions ({n_images} image(s) x {model.config.tokens_per_image} "
            f"+ {n_text} text tokens); with max_new_tokens {max_new_tokens} that is {prompt + max_new_tokens}, "
            f"beyond the model's context of {limit}. Use fewer images or video frames, a shorter question, "
            "or a lower max_new_tokens"
        )


def _pixel_values(model, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One IMAGE batch or a list of them -> pixel_values (N, 3, S, S), in order."""
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    # each batch may have its own size: preprocess them one by one
    pixels = [model.preprocess(batch) for batch in batches]
    if not pixels or sum(p.shape[0] for p in pixels) == 0:
        raise InputError("no images were given; VILA-U answers questions about at least one image")
    return torch.cat(pixels)

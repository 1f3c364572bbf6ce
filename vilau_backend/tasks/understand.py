"""Image and video understanding: VILA-U answers a question about images or a video.

As the original's ``generate_content`` (``vila_u/model/vila_u_arch.py``):

- the prompt is the vicuna_v1 conversation with one ``<image>`` slot per image
  or video frame (:func:`vilau_backend.decoding.prompts.understanding_prompt`), tokenized
  chunk-wise with ``IMAGE_TOKEN_INDEX`` (-200) at each slot;
- each image's projected features replace its slot (image_splicing.py);
- the LLM answers from those embeddings until EOS or ``max_new_tokens``
  (decoding/answer_loop.py, choosing tokens as decoding/token_choice.py says); the
  text is ``decode(new ids, skip_special_tokens=True).strip()``.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..decoding.answer_loop import (DEFAULT_MAX_NEW_TOKENS, TokenCallback, answer_plan, answer_text, generate_text, generate_texts,
                                     reserve_answers)
from ..decoding.compiled_steps import CompileCallback, run_compiles
from ..checkpoint.tokenizer import IMAGE_TOKEN_INDEX
from ..decoding.prompts import refuse_text_that_cannot_fit, understanding_prompt
from ..decoding.token_choice import GREEDY, TextSampling
from ..errors import InputError
from ..media.video import FrameChoice
from ..memory.working_memory import understanding_memory
from .image_splicing import prompt_embeddings
from .requests import DEFAULT_BATCH_SIZE, AnswerRequest, answer_request

if TYPE_CHECKING:
    from ..model.vila_u import VilaUModel

__all__ = [  # the answer API; the loop's, the token choice's and the request's names are imported from here too
    "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_NEW_TOKENS", "GREEDY", "Answer", "AnswerRequest", "TextSampling",
    "answer_each_image", "describe_images", "describe_video", "sample_video_frames",
]


# on_answers(step, texts): the answers' texts so far after `step` (from 0) of their pass
AnswersCallback = Callable[[int, list[str]], object]


@dataclass(frozen=True)
class Answer:
    text: str
    input_ids: list[int]  # the prompt, IMAGE_TOKEN_INDEX at each image slot
    output_ids: list[int]  # generated tokens; ends with EOS when the model stopped by itself


# ---- public API ------------------------------------------------------------------------


def describe_images(
    model: VilaUModel,
    images: torch.Tensor | Sequence[torch.Tensor],
    request: AnswerRequest | str,
    *,
    on_token: TokenCallback | None = None,
    on_answers: AnswersCallback | None = None,
    on_compile: CompileCallback | None = None,
    **fields,
) -> list[Answer]:
    """Answer the request's question about images: ComfyUI IMAGE (B, H, W, C) float 0..1, or a list
    of such batches (each may have its own size). request: an AnswerRequest, or the question with
    the request's fields as keywords.

    ``batch=False``: all images go into one prompt, in order, and one answer comes back
    (the original's ``generate_content([img1, img2, query])``); `on_token` streams it.
    ``batch=True``: every image is its own prompt and gets its own answer, in input order;
    up to `batch_size` answers are generated together in one padded pass
    (:func:`answer_each_image`), and `on_answers(step, texts)` streams them: `texts` holds
    every answer begun so far (earlier passes' finished ones first), `step` counts the
    tokens of the current pass. Each answer samples from its own generator seeded with
    `seed`, so an answer does not depend on the other images or on `batch_size`
    (see :func:`answer_each_image` for how far that holds bit for bit).
    """
    request = answer_request(request, fields)
    pixels = _pixel_values(model, images)  # (N, 3, S, S)
    if not request.batch:
        if on_answers is not None:
            raise TypeError("one answer about all images streams through on_token; on_answers is for batch=True")
        return [_answer_about(model, pixels, request, on_token, on_compile)]
    if on_token is not None:
        raise TypeError("answers generated together stream through on_answers(step, texts), not on_token")
    answers: list[Answer] = []
    for first in range(0, pixels.shape[0], request.batch_size):
        done = [answer.text for answer in answers]
        report = None if on_answers is None else (lambda step, texts, done=done: on_answers(step, done + texts))
        answers += answer_each_image(model, pixels[first : first + request.batch_size], request, on_answers=report,
                                     on_compile=on_compile, pad_to=request.batch_size)
    return answers


def answer_each_image(
    model: VilaUModel,
    pixels: torch.Tensor,
    request: AnswerRequest | str,
    *,
    on_answers: AnswersCallback | None = None,
    on_compile: CompileCallback | None = None,
    pad_to: int | None = None,
    **fields,
) -> list[Answer]:
    """pixels (B, 3, S, S) -> B answers to the same question, one per image, generated together
    (request: as describe_images; its batch and batch_size are the caller's).

    Each image is encoded on its own, exactly as for a single answer (a batched vision pass
    would expose the quantizer's nearest-code choice to other GEMM roundings); the B prompts
    then share one LLM pass (:func:`generate_texts`). That pass runs other kernel shapes than
    B single runs, so its logits may differ from theirs in the last bits: greedy answers are
    the same tokens unless two candidates were tied to that precision (tests/backend/test_batch_answers.py
    measures it). `on_answers(step, texts)` gets the B texts so far after each token.

    pad_to: when the run is compiled, a batch of fewer images is filled up to this many rows with
    copies of its last prompt (answers thrown away), so that a short last batch replays the step
    compiled for the full ones instead of compiling one of its own size."""
    request = answer_request(request, fields)
    input_ids = _prompt_ids(model, request, 1)
    B = pixels.shape[0]
    padded = pad_to is not None and B < pad_to and run_compiles(model, request.compile)
    _reserve(model, request, pad_to if padded else B, input_ids, encoded_at_once=1)
    prompts = [prompt_embeddings(model, input_ids, pixels[i : i + 1]) for i in range(B)]  # B x (T, H)
    if padded:
        # a copy stops when its original stops: the pass takes no step more than it would have
        prompts += [prompts[-1]] * (pad_to - B)
    generators = [_seeded_generator(request.seed) for _ in prompts]
    on_step = None if on_answers is None else (lambda step, tokens, texts: on_answers(step, texts[:B]))
    outputs = generate_texts(
        model, prompts, sampling=request.sampling, max_new_tokens=request.max_new_tokens, generators=generators,
        on_step=on_step, compile=request.compile, on_compile=on_compile,
    )
    return [Answer(text=answer_text(model, ids), input_ids=input_ids, output_ids=ids) for ids in outputs[:B]]


def describe_video(
    model: VilaUModel,
    frames: torch.Tensor,
    request: AnswerRequest | str,
    *,
    choice: FrameChoice | None = FrameChoice(),
    on_token: TokenCallback | None = None,
    on_compile: CompileCallback | None = None,
    **fields,
) -> Answer:
    """Answer the request's question (request: as describe_images) about a video: frames
    (F, H, W, C) float 0..1, of which the model looks at those `choice` picks; by default the
    original's: the model's ``num_video_frames`` spread evenly (all of them when there are fewer).
    `choice` None takes every given frame (frames already chosen, e.g. by
    :func:`vilau_backend.media.video.read_video`)."""
    request = answer_request(request, fields)
    if choice is not None:
        frames, _ = sample_video_frames(frames, model.config.num_video_frames, choice)
    return _answer_about(model, model.preprocess(frames), request, on_token, on_compile)


def sample_video_frames(
    frames: torch.Tensor, num_frames: int, choice: FrameChoice = FrameChoice()
) -> tuple[torch.Tensor, list[int]]:
    """(F, H, W, C) -> the frames `choice` picks (by default min(F, num_frames) evenly spaced ones)
    and their indices."""
    if frames.ndim != 4:
        raise InputError(f"video frames must be shaped (frames, height, width, channels), got {tuple(frames.shape)}")
    indices = choice.indices(frames.shape[0], num_frames)
    return frames[indices], indices


# ---- one prompt ------------------------------------------------------------------------


def _answer_about(
    model: VilaUModel, pixels: torch.Tensor, request: AnswerRequest, on_token: TokenCallback | None,
    on_compile: CompileCallback | None,
) -> Answer:
    """pixels (N, 3, S, S) -> one answer to a prompt with N image slots."""
    input_ids = _prompt_ids(model, request, pixels.shape[0])
    _reserve(model, request, 1, input_ids, encoded_at_once=pixels.shape[0])
    inputs_embeds = prompt_embeddings(model, input_ids, pixels)  # (T, H)
    output_ids = generate_text(
        model, inputs_embeds, sampling=request.sampling, max_new_tokens=request.max_new_tokens,
        generator=_seeded_generator(request.seed), on_token=on_token, compile=request.compile, on_compile=on_compile,
    )
    return Answer(text=answer_text(model, output_ids), input_ids=input_ids, output_ids=output_ids)


# ---- checks and small helpers ----------------------------------------------------------


def _reserve(model, request: AnswerRequest, rows: int, input_ids: list[int], encoded_at_once: int) -> None:
    """Ask for the run's working memory (memory/working_memory.py) before any image is encoded, so that a
    run that cannot fit is refused before it allocates: the answer loop's estimate for `rows` prompts of
    these ids (one question, so of one length: no padding) and the encoding of their images."""
    prompt_len = len(input_ids) + input_ids.count(IMAGE_TOKEN_INDEX) * (model.config.tokens_per_image - 1)
    _, key, answer = answer_plan(model, rows, prompt_len, request.max_new_tokens, request.compile)
    memory = understanding_memory(model, answer, rows, prompt_len, encoded_at_once)
    reserve_answers(model, key, memory, rows, request.max_new_tokens)


def _seeded_generator(seed: int) -> torch.Generator:
    # a CPU generator: tokens are drawn on the CPU (the request checked the seed's range)
    return torch.Generator(device="cpu").manual_seed(seed)


def _prompt_ids(model, request: AnswerRequest, n_images: int) -> list[int]:
    """The prompt's ids with `n_images` slots; a prompt that can't fit in the context is refused naming
    the input to shorten (a text far too long for it before it is tokenized)."""
    texts = {"system_prompt": request.system, "question": request.question}  # the nodes' input names
    refuse_text_that_cannot_fit(model.tokenizer, texts, model.config.llm.context_length)
    prompt = understanding_prompt(request.question, n_images, system=request.system)
    input_ids = model.tokenizer.tokenize_with_image_slots(prompt)
    _check_context(model, input_ids, request.max_new_tokens, texts)
    return input_ids


def _check_context(model, input_ids: list[int], max_new_tokens: int, texts: dict[str, str]) -> None:
    # (max_new_tokens < 1 is refused by generate_texts, which every answer goes through)
    n_images = input_ids.count(IMAGE_TOKEN_INDEX)
    n_text = len(input_ids) - n_images
    image_positions = n_images * model.config.tokens_per_image
    prompt = n_text + image_positions
    limit = model.config.llm.context_length
    if prompt + max_new_tokens <= limit:
        return
    counts = {name: len(model.tokenizer.encode(text, add_bos=False)) for name, text in texts.items()}
    longest = max(counts, key=counts.get)
    if counts[longest] >= image_positions:
        lead, advice = f"the {longest} is too long ({counts[longest]} tokens)", f"Shorten the {longest}"
    else:
        lead, advice = f"{n_images} image(s) take {image_positions} positions", "Use fewer images or video frames"
    of_which = ", ".join(f"{name} {count}" for name, count in counts.items())
    raise InputError(
        f"{lead}: the prompt takes {prompt} positions ({n_images} image(s) x {model.config.tokens_per_image} "
        f"+ {n_text} text tokens, of which {of_which}); with max_new_tokens {max_new_tokens} that is "
        f"{prompt + max_new_tokens}, beyond the model's context of {limit}. {advice}, or lower max_new_tokens"
    )


def _pixel_values(model, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One IMAGE batch or a list of them -> pixel_values (N, 3, S, S), in order."""
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    # each batch may have its own size: preprocess them one by one
    pixels = [model.preprocess(batch) for batch in batches]
    if not pixels or sum(p.shape[0] for p in pixels) == 0:
        raise InputError("no images were given; VILA-U answers questions about at least one image")
    return torch.cat(pixels)

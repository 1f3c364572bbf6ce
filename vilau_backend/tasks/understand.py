"""Image and video understanding: VILA-U answers a question about images or a video.

As the original's ``generate_content`` (``vila_u/model/vila_u_arch.py``):

- the prompt is the vicuna_v1 conversation with one ``<image>`` slot per image
  or video frame (:func:`vilau_backend.decoding.prompts.understanding_prompt`), tokenized
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

from ..decoding import compiled_steps, text_step
from ..errors import InputError
from ..model.llm import additive_mask, forward_hidden, new_dynamic_cache, padded_positions
from ..decoding.compiled_steps import CompileCallback
from ..decoding.prompts import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, SYSTEM_PROMPT, understanding_prompt
from ..media.video import FrameChoice

if TYPE_CHECKING:
    from ..model.vila_u import VilaUModel

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
# answers generated together in one pass: memory grows with it (one KV cache row per answer)
DEFAULT_BATCH_SIZE = 8
REPLACEMENT_CHARACTER = "\ufffd"  # what decoding gives for an incomplete UTF-8 byte sequence

# on_token(step, token_id, text_so_far): step counts from 0 within one answer
TokenCallback = Callable[[int, int, str], object]
# on_answers(step, texts): the answers' texts so far after `step` (from 0) of their pass
AnswersCallback = Callable[[int, list[str]], object]
# on_step(step, tokens, texts): each row's new token (None once stopped) and text so far
StepCallback = Callable[[int, list["int | None"], list[str]], object]


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
    batch_size: int = DEFAULT_BATCH_SIZE,
    system: str = SYSTEM_PROMPT,
    sampling: TextSampling = TextSampling(),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    on_token: TokenCallback | None = None,
    on_answers: AnswersCallback | None = None,
    compile: bool | None = None,
    on_compile: CompileCallback | None = None,
) -> list[Answer]:
    """Answer `query` about images: ComfyUI IMAGE (B, H, W, C) float 0..1, or a list of such
    batches (each may have its own size).

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
    _check_query(query)
    _check_batch_size(batch_size)
    pixels = _pixel_values(model, images)  # (N, 3, S, S)
    options = dict(system=system, sampling=sampling, max_new_tokens=max_new_tokens, seed=seed, compile=compile,
                   on_compile=on_compile)
    if not batch:
        if on_answers is not None:
            raise TypeError("one answer about all images streams through on_token; on_answers is for batch=True")
        return [_answer_about(model, pixels, query, on_token=on_token, **options)]
    if on_token is not None:
        raise TypeError("answers generated together stream through on_answers(step, texts), not on_token")
    answers: list[Answer] = []
    for first in range(0, pixels.shape[0], batch_size):
        done = [answer.text for answer in answers]
        report = None if on_answers is None else (lambda step, texts, done=done: on_answers(step, done + texts))
        answers += answer_each_image(model, pixels[first : first + batch_size], query, on_answers=report, **options)
    return answers


def answer_each_image(
    model: VilaUModel,
    pixels: torch.Tensor,
    query: str,
    *,
    system: str = SYSTEM_PROMPT,
    sampling: TextSampling = TextSampling(),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    on_answers: AnswersCallback | None = None,
    compile: bool | None = None,
    on_compile: CompileCallback | None = None,
) -> list[Answer]:
    """pixels (B, 3, S, S) -> B answers to the same question, one per image, generated together.

    Each image is encoded on its own, exactly as for a single answer (a batched vision pass
    would expose the quantizer's nearest-code choice to other GEMM roundings); the B prompts
    then share one LLM pass (:func:`generate_texts`). That pass runs other kernel shapes than
    B single runs, so its logits may differ from theirs in the last bits: greedy answers are
    the same tokens unless two candidates were tied to that precision (tests/backend/test_batch_answers.py
    measures it). `on_answers(step, texts)` gets the B texts so far after each token."""
    _check_query(query)
    input_ids = model.tokenizer.tokenize_with_image_slots(understanding_prompt(query, 1, system=system))
    _check_context(model, input_ids, max_new_tokens)
    prompts = [_prompt_embeddings(model, input_ids, pixels[i : i + 1]) for i in range(pixels.shape[0])]  # B x (T, H)
    generators = [_seeded_generator(seed) for _ in prompts]
    on_step = None if on_answers is None else (lambda step, tokens, texts: on_answers(step, texts))
    outputs = generate_texts(
        model, prompts, sampling=sampling, max_new_tokens=max_new_tokens, generators=generators, on_step=on_step,
        compile=compile, on_compile=on_compile,
    )
    return [Answer(text=_answer_text(model, ids), input_ids=input_ids, output_ids=ids) for ids in outputs]


def describe_video(
    model: VilaUModel,
    frames: torch.Tensor,
    query: str,
    *,
    choice: FrameChoice | None = FrameChoice(),
    system: str = SYSTEM_PROMPT,
    sampling: TextSampling = TextSampling(),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    on_token: TokenCallback | None = None,
    compile: bool | None = None,
    on_compile: CompileCallback | None = None,
) -> Answer:
    """Answer `query` about a video: frames (F, H, W, C) float 0..1, of which the model looks at
    those `choice` picks; by default the original's: the model's ``num_video_frames`` spread
    evenly (all of them when there are fewer). `choice` None takes every given frame (frames
    already chosen, e.g. by :func:`vilau_backend.media.video.read_video`)."""
    _check_query(query)
    if choice is not None:
        frames, _ = sample_video_frames(frames, model.config.num_video_frames, choice)
    return _answer_about(
        model, model.preprocess(frames), query, system=system, sampling=sampling, max_new_tokens=max_new_tokens,
        seed=seed, on_token=on_token, compile=compile, on_compile=on_compile,
    )


def sample_video_frames(
    frames: torch.Tensor, num_frames: int, choice: FrameChoice = FrameChoice()
) -> tuple[torch.Tensor, list[int]]:
    """(F, H, W, C) -> the frames `choice` picks (by default min(F, num_frames) evenly spaced ones)
    and their indices."""
    if frames.ndim != 4:
        raise InputError(f"video frames must be shaped (frames, height, width, channels), got {tuple(frames.shape)}")
    indices = choice.indices(frames.shape[0], num_frames)
    wanted = choice.count or num_frames
    if len(indices) < wanted:
        log.warning("the chosen part of the video gives %d frames, fewer than the %d asked for; using them",
                    len(indices), wanted)
    return frames[indices], indices


# ---- one prompt ------------------------------------------------------------------------


def _answer_about(
    model: VilaUModel,
    pixels: torch.Tensor,
    query: str,
    *,
    system: str,
    sampling: TextSampling,
    max_new_tokens: int,
    seed: int,
    on_token: TokenCallback | None,
    compile: bool | None = None,
    on_compile: CompileCallback | None = None,
) -> Answer:
    """pixels (N, 3, S, S) -> one answer to a prompt with N image slots."""
    input_ids = model.tokenizer.tokenize_with_image_slots(understanding_prompt(query, pixels.shape[0], system=system))
    _check_context(model, input_ids, max_new_tokens)
    inputs_embeds = _prompt_embeddings(model, input_ids, pixels)  # (T, H)
    output_ids = generate_text(
        model, inputs_embeds, sampling=sampling, max_new_tokens=max_new_tokens, generator=_seeded_generator(seed),
        on_token=on_token, compile=compile, on_compile=on_compile,
    )
    return Answer(text=_answer_text(model, output_ids), input_ids=input_ids, output_ids=output_ids)


@torch.inference_mode()
def _prompt_embeddings(model: VilaUModel, input_ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """Prompt ids with N image slots + pixels (N, 3, S, S) -> the LLM's inputs_embeds (T, H)."""
    n_images = pixels.shape[0]
    z_q = model.encode_pixels(pixels).z_q  # (N, h, w, C)
    # as the original: understanding feeds the quantizer's z_q (not the code-embedding sum)
    image_embeds = model.project(z_q.reshape(n_images, -1, z_q.shape[-1]))  # (N, P, H)
    return splice_image_embeddings(model, input_ids, image_embeds)


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
    compile: bool | None = None,
    on_compile: CompileCallback | None = None,
) -> list[int]:
    """inputs_embeds (T, H) -> new token ids, ending at EOS or after max_new_tokens: one prompt
    through :func:`generate_texts` (a batch of one needs no padding and runs the same kernels)."""
    on_step = None
    if on_token is not None:
        def on_step(step: int, tokens: list[int | None], texts: list[str]) -> None:
            on_token(step, tokens[0], texts[0])
    return generate_texts(
        model, [inputs_embeds], sampling=sampling, max_new_tokens=max_new_tokens, generators=[generator],
        on_step=on_step, compile=compile, on_compile=on_compile,
    )[0]


@torch.inference_mode()
def generate_texts(
    model,
    prompts: Sequence[torch.Tensor],
    *,
    sampling: TextSampling = GREEDY,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    generators: Sequence[torch.Generator | None] | None = None,
    on_step: StepCallback | None = None,
    compile: bool | None = None,
    on_compile: CompileCallback | None = None,
) -> list[list[int]]:
    """B prompts' inputs_embeds, each (T_b, H) -> B lists of new token ids, each ending at its EOS
    or after max_new_tokens. Row b samples only from generators[b].

    The prompts are left-padded into one batch and step together; a row that has stopped is fed
    its EOS until all have (its outputs ignored, no draws from its generator). `on_step(step,
    tokens, texts)` follows every step: the new token of each row (None once it has stopped) and
    each row's text so far, up to its last complete character (:func:`streamed_text`).

    compile: decode through the compiled step (vilau_backend/decoding/text_step.py; None: on CUDA
    only); `on_compile` is called before a run that
    compiles. Compiled and eager answers draw the same numbers; their tokens can differ only
    where kernel rounding flips a near-tie. If `on_step` raises, the next run is unaffected."""
    rows = len(prompts)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be 1 or more, got {max_new_tokens}")
    generators = list(generators) if generators is not None else [None] * rows
    if rows < 1 or len(generators) != rows:
        raise InputError(f"give one generator per prompt: {rows} prompt(s), {len(generators)} generator(s)")
    if sampling.do_sample and any(g is None for g in generators):
        raise InputError("sampling needs a torch.Generator per prompt; pass seeded ones (or use greedy decoding)")
    eos = model.tokenizer.eos_token_id
    processors = _logits_processors(sampling)
    batch = PromptBatch(prompts)
    decoder = _Decoder(model, batch, max_new_tokens, compile, on_compile)
    logits = decoder.prefill()  # (B, V)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    live = [True] * rows
    seen = torch.empty((rows, 0), dtype=torch.long, device=logits.device)  # (B, n) generated so far
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, seen, processors, sampling.do_sample, generators, live, eos)  # (B,)
        seen = torch.cat([seen, tokens[:, None]], dim=1)
        new = [int(t) if alive else None for t, alive in zip(tokens.tolist(), live)]
        for b, token in enumerate(new):
            if token is not None:
                outputs[b].append(token)
                live[b] = token != eos
        if on_step is not None:
            on_step(step, new, [streamed_text(model, ids) for ids in outputs])
        if not any(live) or step == max_new_tokens - 1:
            break
        logits = decoder.step(tokens, step)
    return outputs


class _Decoder:
    """The LLM side of one `generate_texts` run: eager (PromptBatch on a DynamicCache that lives
    only in the run) or compiled (text_step.py, whose static cache stays on the model for the next
    run of its size)."""

    def __init__(self, model, batch: PromptBatch, max_new_tokens: int, compile: bool | None,
                 on_compile: CompileCallback | None):
        self.model, self.batch = model, batch
        self.compiled = compiled_steps.run_compiles(model, compile)
        if not self.compiled:
            self.cache = new_dynamic_cache(model.llm)
            return
        rows, prompt_len = batch.embeds.shape[:2]
        self.key = text_step.text_step_key(model, rows, prompt_len, max_new_tokens)
        self.state = compiled_steps.step_state(model, self.key, True, text_step.TextStepState)
        if on_compile is not None and compiled_steps.needs_compiling(model, self.key):
            on_compile()
        self.step_function = compiled_steps.compiled_step(text_step.decode_step, model.device)

    def prefill(self) -> torch.Tensor:
        if not self.compiled:
            return self.batch.prefill(self.model.llm, self.cache)
        return self.state.prefill(self.model, self.batch.embeds, self.batch.key_mask)

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        if not self.compiled:
            return self.batch.decode_step(self.model.llm, tokens, step, self.cache)
        logits = self.state.decode(self.step_function, self.model, tokens, step)
        if step == 0:  # compiled now: a later run of this size, even after a cancel, only replays
            compiled_steps.mark_compiled(self.model, self.key)
        return logits


class PromptBatch:
    """B prompt embeddings of lengths T_b, left-padded to T = max T_b, with the masks and positions
    that keep the padding invisible (as the CFG rows of generation: additive 4-D masks,
    positions counted from each row's first real token). Rows of one length need none of that:
    they run with the causal mask transformers derives, as a single prompt always does."""

    def __init__(self, prompts: Sequence[torch.Tensor]):
        lengths = [p.shape[0] for p in prompts]
        rows, length = len(prompts), max(lengths)
        first = prompts[0]
        self.embeds = first.new_zeros((rows, length, first.shape[-1]))  # (B, T, H)
        self.key_mask = torch.zeros((rows, length), dtype=torch.bool, device=first.device)  # (B, K), K grows
        for b, prompt in enumerate(prompts):
            self.embeds[b, length - prompt.shape[0] :] = prompt
            self.key_mask[b, length - prompt.shape[0] :] = True
        self.padded = min(lengths) != length
        self.lengths = torch.tensor(lengths, device=first.device)[:, None]  # (B, 1)

    def prefill(self, llm, cache) -> torch.Tensor:
        """The whole batch into `cache` -> logits at the last position (B, V) float32."""
        options = {}
        if self.padded:
            length = self.embeds.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=self.embeds.device).tril()
            allowed = self.key_mask[:, None, None, :] & causal[None, None]  # (B, 1, T, T)
            options = dict(attention_mask=additive_mask(allowed, self.embeds.dtype),
                           position_ids=padded_positions(self.key_mask))
        hidden = forward_hidden(llm, cache, inputs_embeds=self.embeds, **options)  # (B, T, H)
        # as the original: logits = lm_head(hidden).float(), only the last position is needed
        return llm.lm_head(hidden[:, -1]).float()

    def decode_step(self, llm, tokens: torch.Tensor, step: int, cache) -> torch.Tensor:
        """Feed each row's token (B,) of generation step `step` -> next logits (B, V) float32."""
        device = llm.lm_head.weight.device
        options = {}
        if self.padded:
            self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones((self.key_mask.shape[0], 1))], dim=1)
            options = dict(attention_mask=additive_mask(self.key_mask[:, None, None, :], self.embeds.dtype))
        hidden = forward_hidden(
            llm, cache, input_ids=tokens[:, None].to(device), position_ids=(self.lengths + step).to(device), **options
        )  # (B, 1, H)
        return llm.lm_head(hidden[:, -1]).float()


def prefill(llm, inputs_embeds: torch.Tensor, cache) -> torch.Tensor:
    """Run one prompt (T, H) into `cache`; logits at its last position (1, V) float32."""
    return PromptBatch([inputs_embeds]).prefill(llm, cache)


def next_token(logits: torch.Tensor, generated: list[int], processors, do_sample: bool, generator) -> int:
    """logits (1, V) float32 -> the chosen token id."""
    seen = torch.tensor([generated], dtype=torch.long, device=logits.device)  # (1, n)
    return int(next_tokens(logits, seen, processors, do_sample, [generator], [True], eos=0)[0])


def next_tokens(
    logits: torch.Tensor, seen: torch.Tensor, processors, do_sample: bool, generators, live: list[bool], eos: int
) -> torch.Tensor:
    """logits (B, V) float32, generated ids seen (B, n) -> the chosen ids (B,); `eos` for stopped rows."""
    # the processors see the generated ids only, as `generate` does when given embeddings
    scores = processors(seen, logits)  # (B, V)
    if not do_sample:
        return scores.argmax(dim=-1).masked_fill_(~torch.tensor(live, device=scores.device), eos)
    # drawn on the CPU, row by row from each row's generator: the same seed picks the same
    # token on any device and whatever the other rows are
    probs = torch.softmax(scores, dim=-1).cpu()  # (B, V)
    chosen = [
        int(torch.multinomial(probs[b : b + 1], num_samples=1, generator=generators[b])) if alive else eos
        for b, alive in enumerate(live)
    ]
    return torch.tensor(chosen, dtype=torch.long, device=logits.device)


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


def streamed_text(model, output_ids: list[int]) -> str:
    """The answer so far for streaming, up to its last complete character.

    A character the vocabulary lacks arrives as one byte-fallback token per UTF-8 byte, and
    decoding before its last byte ends in U+FFFD; that tail is held back until the character
    is complete (the final answer is decoded whole, see :func:`_answer_text`). The ids are
    decoded again each step: bytes of one character span tokens, and sentencepiece's spacing
    depends on the pieces around; cheap next to an LLM step, and only done when someone listens."""
    return _answer_text(model, output_ids).rstrip(REPLACEMENT_CHARACTER).rstrip()


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


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InputError(f"batch_size (answers generated together) must be 1 or more, got {batch_size}")


def _check_context(model, input_ids: list[int], max_new_tokens: int) -> None:
    # (max_new_tokens < 1 is refused by generate_texts, which every answer goes through)
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

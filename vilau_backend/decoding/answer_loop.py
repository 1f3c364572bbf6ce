"""The token loop of answers: B prompt embeddings in, B lists of new token ids out.

The loop is our own rather than ``llm.generate`` so that sampling draws only from a
``torch.Generator`` seeded by the caller (``generate`` uses the global RNG) and a per-step
callback can stream and cancel. The prompts are left-padded into one batch and prefilled once,
then one token per step for all rows through text_step.py's step, eager or compiled on the same
kind of state (`AnswerSteps`), as image generation runs position_step.py's. The token choice
(token_choice.py) is the same for both.

Shapes: B answers (rows), T padded prompt length, H LLM hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from ..memory import working_memory
from . import compiled_steps
from .compile_choice import CompiledStepFailed
from .compiled_steps import CompileCallback, StepKey
from .text_step import TextState, decode_step, left_pad, text_step_key
from .token_choice import GREEDY, TextSampling, logits_processors, next_tokens

DEFAULT_MAX_NEW_TOKENS = 512
REPLACEMENT_CHARACTER = "\ufffd"  # what decoding gives for an incomplete UTF-8 byte sequence

# on_token(step, token_id, text_so_far): step counts from 0 within one answer
TokenCallback = Callable[[int, int, str], object]
# on_step(step, tokens, texts): each row's new token (None once stopped) and text so far
StepCallback = Callable[[int, list["int | None"], list[str]], object]


def check_max_new_tokens(max_new_tokens: int) -> None:
    """An answer is at least one token: AnswerRequest asks this when it is made, the token loop again
    for its direct callers."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be 1 or more, got {max_new_tokens}")


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
    check_max_new_tokens(max_new_tokens)
    generators = list(generators) if generators is not None else [None] * rows
    if rows < 1 or len(generators) != rows:
        raise InputError(f"give one generator per prompt: {rows} prompt(s), {len(generators)} generator(s)")
    if sampling.do_sample and any(g is None for g in generators):
        raise InputError("sampling needs a torch.Generator per prompt; pass seeded ones (or use greedy decoding)")
    eos = model.tokenizer.eos_token_id
    processors = logits_processors(sampling)
    steps = AnswerSteps(model, prompts, max_new_tokens, compile, on_compile)
    logits = steps.prefill()  # (B, V)
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
        logits = steps.step(tokens, step)
    return outputs


def answer_plan(model, rows: int, prompt_len: int, max_new_tokens: int,
                compile: bool | None) -> tuple[bool, StepKey, working_memory.WorkingMemory]:
    """Whether a run of `rows` prompts (padded to `prompt_len`) compiles, its state's key and its working
    memory: what AnswerSteps allocates, for callers that ask for it earlier (tasks/understand.py, before
    encoding images)."""
    compiled = compiled_steps.run_compiles(model, compile)
    key = text_step_key(model, rows, prompt_len, max_new_tokens)
    return compiled, key, working_memory.answer_memory(model, rows, prompt_len, key.length, kept=compiled)


def reserve_answers(model, key: StepKey, memory: working_memory.WorkingMemory, rows: int, max_new_tokens: int) -> None:
    working_memory.reserve_for_run(model, key, memory, f"{rows} answer(s) of up to {max_new_tokens} tokens",
                                   "lower batch_size or max_new_tokens")


class AnswerSteps:
    """The LLM side of one `generate_texts` run on a text_step.TextState: `prefill`, then `step` once per
    token, through `decode_step` (eager: a state of the run's own, freed with it) or its compiled form
    (the state stays on the model for the next run of its size). When the compiled step fails, the model
    falls back to eager (compiled_steps.StepCalls) and this run goes on from the same state.

    prompts: B inputs_embeds (T_b, H), left-padded into one batch (text_step.left_pad)."""

    def __init__(self, model, prompts: Sequence[torch.Tensor], max_new_tokens: int, compile: bool | None = False,
                 on_compile: CompileCallback | None = None):
        self.model = model
        self.embeds, self.prompt_mask = left_pad(prompts)  # (B, T, H), (B, T)
        rows, prompt_len = self.prompt_mask.shape
        compiled, key, memory = answer_plan(model, rows, prompt_len, max_new_tokens, compile)
        reserve_answers(model, key, memory, rows, max_new_tokens)
        self.state = compiled_steps.step_state(model, key, compiled, TextState)
        self.calls = compiled_steps.StepCalls(model, key, decode_step, compiled, on_compile)

    def prefill(self) -> torch.Tensor:
        """The prompts into the cache -> logits at their last position (B, V) float32."""
        return self.state.prefill(self.model, self.embeds, self.prompt_mask)

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed tokens (B,) of answer step `step` -> the next logits (B, V) float32."""
        try:
            return self.state.decode(self.calls, self.model, tokens, step)
        except CompiledStepFailed:  # now eager: the step writes only its own cache index and logits, so it runs again
            return self.state.decode(self.calls, self.model, tokens, step)


def streamed_text(model, output_ids: list[int]) -> str:
    """The answer so far for streaming, up to its last complete character.

    A character the vocabulary lacks arrives as one byte-fallback token per UTF-8 byte, and
    decoding before its last byte ends in U+FFFD; that tail is held back until the character
    is complete (the final answer is decoded whole, see :func:`answer_text`). The ids are
    decoded again each step: bytes of one character span tokens, and sentencepiece's spacing
    depends on the pieces around; cheap next to an LLM step, and only done when someone listens."""
    return answer_text(model, output_ids).rstrip(REPLACEMENT_CHARACTER).rstrip()


def answer_text(model, output_ids: list[int]) -> str:
    # as the original: decode(ids, skip_special_tokens=True).strip()
    return model.tokenizer.decode(output_ids, skip_special_tokens=True).strip()

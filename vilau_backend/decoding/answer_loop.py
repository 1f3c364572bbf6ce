"""The token loop of answers: B prompt embeddings in, B lists of new token ids out.

The loop is our own rather than ``llm.generate`` so that sampling draws only from a
``torch.Generator`` seeded by the caller (``generate`` uses the global RNG) and a per-step
callback can stream and cancel. The prompts are left-padded into one batch and prefilled once,
then one token per step for all rows: eagerly on a ``DynamicCache`` that lives only in the run
(`PromptBatch`), or through the compiled step (text_step.py) on a static cache that stays on
the model for the next run of its size. The token choice (token_choice.py) is the same for both.

Shapes: B answers (rows), T padded prompt length, H LLM hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from ..memory import working_memory
from ..model.llm import additive_mask, forward_hidden, new_dynamic_cache, padded_positions
from . import compiled_steps, text_step
from .compile_choice import fall_back
from .compiled_steps import CompileCallback
from .token_choice import GREEDY, TextSampling, logits_processors, next_tokens

DEFAULT_MAX_NEW_TOKENS = 512
REPLACEMENT_CHARACTER = "\ufffd"  # what decoding gives for an incomplete UTF-8 byte sequence

# on_token(step, token_id, text_so_far): step counts from 0 within one answer
TokenCallback = Callable[[int, int, str], object]
# on_step(step, tokens, texts): each row's new token (None once stopped) and text so far
StepCallback = Callable[[int, list["int | None"], list[str]], object]


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
    processors = logits_processors(sampling)
    batch = PromptBatch(prompts)
    steps = _LLMSteps(model, batch, max_new_tokens, compile, on_compile)
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


class _LLMSteps:
    """The LLM side of one `generate_texts` run: eager (PromptBatch on a DynamicCache that lives
    only in the run) or compiled (text_step.py, whose static cache stays on the model for the next
    run of its size)."""

    def __init__(self, model, batch: PromptBatch, max_new_tokens: int, compile: bool | None,
                 on_compile: CompileCallback | None):
        self.model, self.batch, self.on_compile = model, batch, on_compile
        self.compiled = compiled_steps.run_compiles(model, compile)
        self.fed: list[torch.Tensor] = []  # tokens (B,) the compiled steps took, to refill an eager cache
        rows, prompt_len = batch.embeds.shape[:2]
        self.key = text_step.text_step_key(model, rows, prompt_len, max_new_tokens) if self.compiled else None
        length = self.key.length if self.compiled else prompt_len + max_new_tokens  # a DynamicCache grows so far
        memory = working_memory.answer_memory(model, rows, prompt_len, length, kept=self.compiled, masked=batch.padded)
        working_memory.reserve_for_run(model, self.key, memory, f"{rows} answer(s) of up to {max_new_tokens} tokens",
                                       "lower batch_size or max_new_tokens")
        if not self.compiled:
            self.cache = new_dynamic_cache(model.llm)
            return
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
        try:
            logits = self.state.decode(self.step_function, self.model, tokens, step)
        except Exception as error:  # only the step: the callbacks' errors (a cancel) pass unchanged
            return self._go_on_eager(error, tokens, step)
        self.fed.append(tokens)
        if step == 0:  # compiled now: a later run of this size, even after a cancel, only replays
            compiled_steps.mark_compiled(self.model, self.key)
        return logits

    def _go_on_eager(self, error: Exception, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """The compiled step failed at `step`: the answer goes on eager from a DynamicCache refilled with
        the prompts and the tokens fed so far; later runs of the model are eager (compile_choice.py)."""
        notice = fall_back(self.model, error)
        self.model.release_step_states()
        if self.on_compile is not None:
            self.on_compile(notice)
        self.compiled = False
        self.cache = new_dynamic_cache(self.model.llm)
        self.batch.prefill(self.model.llm, self.cache)
        for i, fed in enumerate(self.fed):
            self.batch.decode_step(self.model.llm, fed, i, self.cache)
        return self.batch.decode_step(self.model.llm, tokens, step, self.cache)


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

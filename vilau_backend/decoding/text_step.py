"""One answer token as one fixed-shape step, eager or compiled: the answers' counterpart of position_step.py.

An answer run is a prefill and then one call of `decode_step` per token. Everything that call reads
or writes lives in `TextStepState`, allocated once per (rows, cache-length bucket) and rewritten in
place at the start of a run: the LLM's StaticCache, the key mask, each row's RoPE offset, the fed
tokens and the logits; the step index is a 0-d tensor. Eager runs call `decode_step` itself on a
state of their own; compiled runs call its `torch.compile` (traced once per (rows, bucket): CUDA
graphs on CUDA, inductor on the CPU) on a state kept on the model for the next run of that size.
One state design for both modes means a compiled step that fails can hand the same state, with
its cache as filled so far, to the eager step and the answer goes on (answer_loop.py).

Only the LLM forward and the text head are in the step. Choosing the token stays outside, eager
(transformers' logits processors, one draw per row from its own CPU generator): compiled and
eager answers draw the same numbers, and streaming and cancel work between steps.

Prompts of different lengths are left-padded into one batch (`left_pad`); the masks and positions
keep the padding invisible, as for the CFG rows of image generation: additive 4-D masks over the
whole cache, RoPE positions counted from each row's first real token.

Shapes: B answers (rows), T padded prompt length, L cache length (a multiple of CACHE_BUCKET
holding the prompt and max_new_tokens), H hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.llm import additive_mask, forward_hidden, new_static_cache, padded_positions
from .compiled_steps import StepKey, cache_length, step_key

TEXT = "text"  # StepKey.kind of these states


def text_step_key(model, rows: int, prompt_len: int, max_new_tokens: int) -> StepKey:
    return step_key(model, rows, cache_length(prompt_len, max_new_tokens), kind=TEXT)


def left_pad(prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """B prompt embeddings (T_b, H) -> the batch (B, T, H), T = max T_b, padded on the left with
    zeros, and its mask (B, T), True at real tokens."""
    rows, length, first = len(prompts), max(p.shape[0] for p in prompts), prompts[0]
    embeds = first.new_zeros((rows, length, first.shape[-1]))  # (B, T, H)
    mask = torch.zeros((rows, length), dtype=torch.bool, device=first.device)  # (B, T)
    for b, prompt in enumerate(prompts):
        embeds[b, length - prompt.shape[0]:] = prompt
        mask[b, length - prompt.shape[0]:] = True
    return embeds, mask


class TextStepState:
    """The KV cache and every buffer an answer's decode step reads, for one StepKey of kind "text"."""

    def __init__(self, model, key: StepKey):
        self.key = key
        B, L = key.rows, key.length
        device = torch.device(key.device)
        vocab = model.llm.lm_head.weight.shape[0]
        self.cache = new_static_cache(model.llm, B, L, key.dtype, device)
        self.key_index = torch.arange(L, device=device)  # (L,)
        self.key_mask = torch.ones(B, L, dtype=torch.bool, device=device)  # real prompt tokens, then every answer token
        self.start = torch.zeros((), dtype=torch.long, device=device)  # cache index of the first answer token: T
        self.first_rope_id = torch.zeros(B, 1, dtype=torch.long, device=device)  # RoPE id of the first answer token
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)  # the tokens the next step feeds
        self.logits = torch.zeros(B, vocab, dtype=torch.float32, device=device)  # what that step predicts
        self.steps = torch.arange(L, device=device)  # step s is passed as steps[s], a 0-d tensor
        for buffer in (self.key_mask, self.start, self.first_rope_id, self.tokens, self.logits):
            torch._dynamo.mark_static_address(buffer)

    def prefill(self, model, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Start a run: the left-padded prompts embeds (B, T, H) with their mask (B, T) into the cache
        (eager in both modes: once per answer) -> logits at the last prompt position (B, V) float32."""
        T = embeds.shape[1]
        # transformers 5.x's StaticCache writes at its own running count, not at cache_position: restart it
        self.cache.reset()
        self.key_mask.fill_(True)
        self.key_mask[:, :T].copy_(prompt_mask)
        self.start.fill_(T)
        self.first_rope_id.copy_(prompt_mask.long().sum(-1, keepdim=True))
        causal = self.key_index[None, :] <= torch.arange(T, device=embeds.device)[:, None]  # (T, L)
        allowed = self.key_mask[:, None, None, :] & causal[None, None]  # (B, 1, T, L)
        hidden = forward_hidden(
            model.llm, self.cache, inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
            position_ids=padded_positions(prompt_mask), cache_position=torch.arange(T, device=embeds.device),
        )  # (B, T, H)
        # as the original: logits = lm_head(hidden).float(), only the last position is needed
        return model.llm.lm_head(hidden[:, -1]).float()

    def decode(self, step_function, model, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed tokens (B,) of answer step `step` through `step_function` (`decode_step` or its
        compiled form) -> the next logits (B, V) float32, a copy the next step does not overwrite.
        Step s writes cache index T + s only, so a step that failed half-way can be run again."""
        self.tokens.copy_(tokens)
        step_function(model, self, self.steps[step])
        return self.logits.clone()


def decode_step(model, state: TextStepState, step: torch.Tensor) -> None:
    """Answer step `step` (0-d long tensor): state.tokens in, the logits after them into state.logits."""
    index = state.start + step  # cache index of these tokens
    allowed = (state.key_mask & (state.key_index <= index))[:, None, None, :]  # (B, 1, 1, L)
    embeds = model.llm.get_input_embeddings()(state.tokens[:, None])  # (B, 1, H)
    hidden = forward_hidden(
        model.llm, state.cache, inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
        position_ids=state.first_rope_id + step, cache_position=index.reshape(1),
    )  # (B, 1, H)
    state.logits.copy_(model.llm.lm_head(hidden[:, -1]).float())

"""One answer token as one fixed-shape step, compiled once and replayed.

The compiled counterpart of `PromptBatch.decode_step` (answer_loop.py): the LLM
runs on a StaticCache of fixed length, and every tensor a decode step reads or
writes lives in `TextStepState`, allocated once per (rows, cache-length bucket)
and rewritten in place at the start of a run; the step index is a 0-d tensor.
As for image generation (position_step.py), nothing dynamo would specialise on
changes between tokens or runs, so `torch.compile` traces the step once per
(rows, bucket): CUDA graphs on CUDA, inductor on the CPU.

Only the LLM forward and the text head are compiled. Choosing the token stays
outside, eager and unchanged (transformers' logits processors, one draw per row
from its own CPU generator): compiled and eager answers draw the same numbers,
and streaming and cancel work between steps as before.

Shapes: B answers (rows), T padded prompt length, L cache length (a multiple
of CACHE_BUCKET holding the prompt and max_new_tokens), H hidden, V vocabulary.
"""

from __future__ import annotations

import torch

from ..model.llm import additive_mask, forward_hidden, new_static_cache, padded_positions
from .compiled_steps import StepKey, cache_length, step_key

TEXT = "text"  # StepKey.kind of these states


def text_step_key(model, rows: int, prompt_len: int, max_new_tokens: int) -> StepKey:
    return step_key(model, rows, cache_length(prompt_len, max_new_tokens), kind=TEXT)


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
        self.lengths = torch.zeros(B, 1, dtype=torch.long, device=device)  # each row's real prompt length
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)  # the tokens the next step feeds
        self.logits = torch.zeros(B, vocab, dtype=torch.float32, device=device)  # what that step predicts
        self.steps = torch.arange(L, device=device)  # step s is passed as steps[s], a 0-d tensor
        for buffer in (self.key_mask, self.start, self.lengths, self.tokens, self.logits):
            torch._dynamo.mark_static_address(buffer)

    def prefill(self, model, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Start a run: the left-padded prompts embeds (B, T, H) with their mask (B, T) into the cache
        (eager: once per answer) -> logits at the last prompt position (B, V) float32."""
        T = embeds.shape[1]
        # transformers 5.x's StaticCache writes at its own running count, not at cache_position: restart it
        self.cache.reset()
        self.key_mask.fill_(True)
        self.key_mask[:, :T].copy_(prompt_mask)
        self.start.fill_(T)
        self.lengths.copy_(prompt_mask.long().sum(-1, keepdim=True))
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
        compiled form) -> the next logits (B, V) float32, a copy the next step does not overwrite."""
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
        position_ids=state.lengths + step, cache_position=index.reshape(1),
    )  # (B, 1, H)
    state.logits.copy_(model.llm.lm_head(hidden[:, -1]).float())

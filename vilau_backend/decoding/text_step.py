"""One answer token as one fixed-shape step, eager or compiled: the answers' counterpart of position_step.py.

An answer run is a prefill and then one call of `decode_step` per token. Everything that call
reads or writes lives in `TextState`, allocated once per (rows, cache-length bucket) and rewritten
in place at the start of a run: the LLM's StaticCache with its masks and RoPE offsets
(llm_state.py, shared with the image step), the fed tokens and the logits; the step index is a
0-d tensor. Eager runs call `decode_step` itself on a state of their own; compiled runs call its
`torch.compile` (traced once per (rows, bucket): CUDA graphs on CUDA, inductor on the CPU) on a
state kept on the model for the next run of that size. One state design for both modes means a
compiled step that fails can hand the same state, with its cache as filled so far, to the eager
step and the answer goes on (answer_loop.py).

Only the LLM forward and the text head are in the step. Choosing the token stays outside, eager
(transformers' logits processors, one draw per row from its own CPU generator): compiled and
eager answers draw the same numbers, and streaming and cancel work between steps.

Prompts of different lengths are left-padded into one batch (`left_pad`); llm_state.py's masks and
RoPE ids keep the padding invisible, as for the CFG rows of image generation.

Shapes: B answers (rows), T padded prompt length, L cache length (a multiple of CACHE_BUCKET
holding the prompt and max_new_tokens), H hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .compiled_steps import StepKey, cache_length, step_key
from .llm_state import LLMState

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


class TextState(LLMState):
    """Everything an answer's decode step reads, for one StepKey of kind "text": the LLM's cache and masks
    (llm_state.py), the tokens the next step feeds and the logits it predicts."""

    def __init__(self, model, key: StepKey):
        super().__init__(model, key)
        B, L = key.rows, key.length
        device = torch.device(key.device)
        vocab = model.llm.lm_head.weight.shape[0]
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)  # the tokens the next step feeds
        self.logits = torch.zeros(B, vocab, dtype=torch.float32, device=device)  # what that step predicts
        self.steps = torch.arange(L, device=device)  # step s is passed as steps[s], a 0-d tensor
        for buffer in (self.tokens, self.logits):
            torch._dynamo.mark_static_address(buffer)

    def prefill(self, model, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Start a run: the left-padded prompts embeds (B, T, H) with their mask (B, T) into the cache
        (eager in both modes: once per answer) -> logits at the last prompt position (B, V) float32."""
        self.begin(prompt_mask)
        hidden = super().prefill(model, embeds, self.prompt_rope_ids())  # (B, T, H)
        # as the original: logits = lm_head(hidden).float(), only the last position is needed
        return model.llm.lm_head(hidden[:, -1]).float()

    def decode(self, step_function, model, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed tokens (B,) of answer step `step` through `step_function` (`decode_step` or its
        compiled form) -> the next logits (B, V) float32, a copy the next step does not overwrite.
        A step writes its own cache index and its logits only, so a step that failed half-way can be
        run again."""
        self.tokens.copy_(tokens)
        step_function(model, self, self.steps[step])
        return self.logits.clone()


def decode_step(model, state: TextState, step: torch.Tensor) -> None:
    """Answer step `step` (0-d long tensor): state.tokens in, the logits after them into state.logits."""
    embeds = model.llm.get_input_embeddings()(state.tokens[:, None])  # (B, 1, H)
    hidden = state.step(model, embeds, step)  # (B, 1, H)
    state.logits.copy_(model.llm.lm_head(hidden[:, -1]).float())

"""The LLM's side of a fixed-shape step state, shared by the image step (position_step.py) and the answer step
(text_step.py): a static KV cache of L positions for R rows, which keys each row may see, and where the
steps start in the cache and in RoPE ids.

A run left-pads its R prompts to T tokens (CFG rows, or answers of different lengths), prefills them at
cache indices 0..T-1, and then feeds one input per step at cache index T + s. Masks are additive 4-D
masks over the whole cache (model/llm.py), so padding stays invisible and no shape changes from one step
or one run to the next; RoPE ids count from each row's first real token, as the original's
`cumsum(mask) - 1`. Every buffer here is allocated once per state and rewritten in place (`begin`), at
fixed addresses that a CUDA graph can replay.

Shapes: R rows, T prompt length, L cache length, H hidden.
"""

from __future__ import annotations

import torch

from ..model.llm import additive_mask, forward_hidden, new_static_cache, padded_positions
from .compiled_steps import StepKey


class LLMState:
    """The KV cache and the buffers that place a run's inputs in it, for one StepKey."""

    def __init__(self, model, key: StepKey):
        self.key = key
        R, L = key.rows, key.length
        device = torch.device(key.device)
        self.cache = new_static_cache(model.llm, R, L, key.dtype, device)
        self.key_index = torch.arange(L, device=device)  # (L,)
        self.key_mask = torch.ones(R, L, dtype=torch.bool, device=device)  # real prompt tokens, then every step's input
        self.start = torch.zeros((), dtype=torch.long, device=device)  # cache index of step 0's input: T
        self.first_rope_id = torch.zeros(R, 1, dtype=torch.long, device=device)  # RoPE id of step 0's input
        self.prompt_len = 0
        for buffer in (self.key_mask, self.start, self.first_rope_id):
            torch._dynamo.mark_static_address(buffer)

    def begin(self, prompt_mask: torch.Tensor) -> None:
        """A new run of left-padded prompts whose real tokens are `prompt_mask` (R, T) bool."""
        T = prompt_mask.shape[1]
        self.prompt_len = T
        # transformers 5.x's StaticCache writes at its own running count, not at cache_position: restart it
        self.cache.reset()
        self.key_mask.fill_(True)
        self.key_mask[:, :T].copy_(prompt_mask)
        self.start.fill_(T)
        self.first_rope_id.copy_(prompt_mask.long().sum(-1, keepdim=True))

    def prompt_rope_ids(self) -> torch.Tensor:
        """RoPE ids of the prompt's cache positions (R, T): padding set to 1, as the original."""
        return padded_positions(self.key_mask[:, : self.prompt_len])

    def prefill(self, model, embeds: torch.Tensor, rope_ids: torch.Tensor) -> torch.Tensor:
        """Inputs embeds (R, T', H) at cache indices 0..T'-1 with RoPE ids (R, T') (eager: once per run)
        -> final-norm hidden states (R, T', H)."""
        T = embeds.shape[1]
        causal = self.key_index[None, :] <= torch.arange(T, device=embeds.device)[:, None]  # (T', L)
        allowed = self.key_mask[:, None, None, :] & causal[None, None]  # (R, 1, T', L)
        return forward_hidden(
            model.llm, self.cache, inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
            position_ids=rope_ids, cache_position=torch.arange(T, device=embeds.device),
        )

    def step(self, model, embeds: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Step `step` (0-d long tensor): one input per row, embeds (R, 1, H), at cache index T + step,
        seeing the prompt's real tokens and every earlier step -> final-norm hidden state (R, 1, H).
        It writes that cache index only, so running a step again gives what it gave."""
        index = self.start + step
        allowed = (self.key_mask & (self.key_index <= index))[:, None, None, :]  # (R, 1, 1, L)
        return forward_hidden(
            model.llm, self.cache, inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
            position_ids=self.first_rope_id + step, cache_position=index.reshape(1),
        )

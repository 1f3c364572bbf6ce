"""One grid position as one fixed-shape step, compiled once and replayed.

A generation run is P calls of `advance`: the depth transformer picks the D
codes of position p from the LLM state (sampling with uniforms drawn up front,
forcing the codes an edit keeps), and the LLM takes their projected sum as its
next input. Everything that call reads or writes lives in `StepState`, device
tensors allocated once per (rows, cache-length bucket) and rewritten in place
at the start of a run; the position is a 0-d tensor. No shape, and no Python
value that dynamo would specialise on, changes from one position or one run to
the next, so `torch.compile` traces the step once per (rows, bucket) and
reuses it for every position of every later run of that size: with CUDA graphs
on CUDA (mode "reduce-overhead": one graph launch per position instead of
thousands of kernel launches), plain inductor on the CPU. The CPU path is what
the tests compile; the CUDA path is exercised by dev/bench/gpu_check.sh.

Buffers keep fixed addresses (`mark_static_address`, as transformers does for
its StaticCache), which is what lets a CUDA graph that writes into them be
replayed. The cache length is the prompt plus the positions rounded up to a
multiple of CACHE_BUCKET (compiled_steps.py), so a new prompt length does not mean a new graph.

Shapes: B images, R = 2B rows (conditional, then unconditional), T prompt
length, L cache length, P positions, D depth, H LLM hidden size.
"""

from __future__ import annotations

import torch

from ..model.depth import SampleCodes
from ..model.llm import additive_mask, forward_hidden, new_static_cache, padded_positions
from .compiled_steps import StepKey, compiled_step
from .sampling import pick_codes, sampling_knobs


class UniformSampler:
    """SampleCodes of one position: depth d draws with uniforms u[:, d], from the run's pre-drawn (B, P, D)."""

    def __init__(self, u: torch.Tensor, knobs: torch.Tensor):
        self.u = u  # (B, D) float32
        self.knobs = knobs  # (3,): temperature, top_k, top_p

    def __call__(self, logits: torch.Tensor, d: int) -> torch.Tensor:
        return pick_codes(logits, self.u[:, d], self.knobs)


class StepState:
    """The KV cache and every buffer a generation step reads, for one StepKey.

    `begin` writes one run's prompt mask, uniforms, edit masks and settings into
    the buffers; `prefill` runs the prompt; `advance(p)` (see the function) then
    produces position p's codes into `codes` and the LLM state for p + 1 into
    `hidden`."""

    def __init__(self, model, key: StepKey):
        self.key = key
        R, L = key.rows, key.length
        B, D, H = R // 2, model.config.quantizer.depth, model.config.llm.hidden_size
        device = torch.device(key.device)
        self.cache = new_static_cache(model.llm, R, L, key.dtype, device)
        self.key_index = torch.arange(L, device=device)  # (L,)
        self.key_mask = torch.ones(R, L, dtype=torch.bool, device=device)  # real prompt tokens, then every position
        self.start = torch.zeros((), dtype=torch.long, device=device)  # cache index of position 0's input: T
        self.first_rope_id = torch.zeros(R, 1, dtype=torch.long, device=device)  # RoPE position id of grid position 0's input
        self.hidden = torch.zeros(R, H, dtype=key.dtype, device=device)  # LLM state for the next position
        self.uniforms = torch.zeros(B, L, D, dtype=torch.float32, device=device)  # (B, L, D): P <= L
        self.given = torch.zeros(B, L, D, dtype=torch.long, device=device)
        self.keep = torch.zeros(B, L, D, dtype=torch.bool, device=device)
        self.codes = torch.zeros(B, L, D, dtype=torch.long, device=device)
        self.cfg = torch.zeros((), dtype=torch.float32, device=device)
        self.knobs = torch.zeros(3, dtype=torch.float32, device=device)
        self.grid_indices = torch.arange(L, device=device)  # grid position p is passed as grid_indices[p], a 0-d tensor
        self.prompt_len = 0
        for buffer in (self.key_mask, self.start, self.first_rope_id, self.hidden, self.uniforms, self.given,
                       self.keep, self.codes, self.cfg, self.knobs):
            torch._dynamo.mark_static_address(buffer)

    def begin(self, input_ids, attention_mask, uniforms, sampling, given=None, keep=None) -> None:
        """One run's inputs: prompt (R, T) ids and mask, uniforms (B, P, D), ImageSampling,
        and optionally the codes an edit forces: given (B, P, D) long where keep (B, P, D) bool."""
        T, P = input_ids.shape[1], uniforms.shape[1]
        self.input_ids = input_ids.to(self.key_index.device)
        self.prompt_len = T
        # transformers 5.x's StaticCache writes at its own running count, not at cache_position: restart it
        self.cache.reset()
        self.key_mask.fill_(True)
        self.key_mask[:, :T].copy_(attention_mask)
        self.start.fill_(T)
        self.first_rope_id.copy_(attention_mask.long().sum(-1, keepdim=True))
        self.uniforms[:, :P].copy_(uniforms)
        self.keep.zero_()
        if keep is not None:
            self.keep[:, :P].copy_(keep)
            self.given[:, :P].copy_(given)
        self.cfg.fill_(sampling.cfg)
        self.knobs.copy_(sampling_knobs(sampling.temperature, sampling.top_k, sampling.top_p, self.knobs.device))

    def prefill(self, model, prefix: torch.Tensor | None = None) -> None:
        """The prompts through the LLM (eager: one call per run), followed by `prefix` (R, n, H),
        the inputs of the first n positions when an edit keeps them; sets `hidden` to the state
        for position n."""
        embeds = model.llm.get_input_embeddings()(self.input_ids)  # (R, T, H)
        rope_ids = padded_positions(self.key_mask[:, : self.prompt_len])  # (R, T)
        if prefix is not None and prefix.shape[1]:
            steps = torch.arange(prefix.shape[1], device=rope_ids.device)
            embeds = torch.cat([embeds, prefix.to(embeds.dtype)], dim=1)  # (R, T + n, H)
            rope_ids = torch.cat([rope_ids, self.first_rope_id + steps], dim=1)
        T = embeds.shape[1]
        causal = self.key_index[None, :] <= torch.arange(T, device=embeds.device)[:, None]  # (T, L)
        allowed = self.key_mask[:, None, None, :] & causal[None, None]  # (R, 1, T, L)
        hidden = forward_hidden(
            model.llm, self.cache, inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype),
            position_ids=rope_ids, cache_position=torch.arange(T, device=embeds.device),
        )
        self.hidden.copy_(hidden[:, -1])


def next_input(model, position_codes: torch.Tensor) -> torch.Tensor:
    """The LLM input after a position: the projected sum of its code embeddings, for both CFG halves.

    Computed with the original's exact ops and shapes (a cumsum over depth, then the projector
    on the non-contiguous (R, 1, C) slice): on such a slice torch's Linear rounds the matmul
    before adding the bias, and in bf16 that single rounding step moves about a fifth of the
    values by an ulp, enough to flip near-tied codes later on."""
    rows = position_codes.repeat(2, 1)[:, None, :]  # (R, 1, D): both halves continue from the same codes
    sums = torch.cumsum(model.vision.quantizer.embed_codes(rows), dim=-2)[:, :, -1, :]  # (R, 1, C)
    return model.projector(sums)[:, 0]  # (R, H)


def prefix_inputs(model, prefix_codes: torch.Tensor) -> torch.Tensor:
    """The LLM inputs of several known positions at once: codes (B, n, D) -> (R, n, H),
    the same projected code sums `next_input` makes one position at a time."""
    rows = prefix_codes.repeat(2, 1, 1)  # (R, n, D)
    sums = torch.cumsum(model.vision.quantizer.embed_codes(rows), dim=-2)[:, :, -1, :]  # (R, n, C)
    return model.projector(sums)  # (R, n, H)


def advance(model, state: StepState, p: torch.Tensor) -> None:
    """Position p (0-d long tensor): its codes into state.codes[:, p], the LLM state after them into state.hidden.

    The LLM step also runs after the last position (its state is not used): one step in P, for one
    function with one shape."""
    depth = model.vision.depth
    at_p = p.reshape(1)
    sampler: SampleCodes = UniformSampler(state.uniforms.index_select(1, at_p)[:, 0], state.knobs)
    codes, _ = depth.generate(
        state.hidden, model.vision.quantizer.embed_codes, state.cfg, sampler,
        given=state.given.index_select(1, at_p)[:, 0], keep=state.keep.index_select(1, at_p)[:, 0],
    )  # (B, D)
    state.codes.index_copy_(1, at_p, codes[:, None])
    embed = next_input(model, codes)  # (R, H)
    index = state.start + p  # cache index of this input
    allowed = (state.key_mask & (state.key_index <= index))[:, None, None, :]  # (R, 1, 1, L)
    hidden = forward_hidden(
        model.llm, state.cache, inputs_embeds=embed[:, None, :], attention_mask=additive_mask(allowed, embed.dtype),
        position_ids=state.first_rope_id + p, cache_position=index.reshape(1),
    )  # (R, 1, H)
    state.hidden.copy_(hidden[:, -1])


def compiled_advance(device: torch.device):
    """`advance` compiled for this kind of device."""
    return compiled_step(advance, device)

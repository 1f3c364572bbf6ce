"""One grid position as one fixed-shape step, compiled once and replayed.

A generation run is P calls of `advance`: the depth transformer picks the D
codes of position p from the LLM state (sampling with uniforms drawn up front,
forcing the codes an edit keeps), and the LLM takes their projected sum as its
next input. Everything that call reads or writes lives in `PositionState`, device
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
from .compiled_steps import StepKey
from .llm_state import LLMState
from .sampling import pick_codes, sampling_knobs


class UniformSampler:
    """SampleCodes of one position: depth d draws with uniforms u[:, d], from the run's pre-drawn (B, P, D)."""

    def __init__(self, u: torch.Tensor, knobs: torch.Tensor):
        self.u = u  # (B, D) float32
        self.knobs = knobs  # (3,): temperature, top_k, top_p

    def __call__(self, logits: torch.Tensor, d: int) -> torch.Tensor:
        return pick_codes(logits, self.u[:, d], self.knobs)


class PositionState(LLMState):
    """Everything a generation step reads, for one StepKey: the LLM's cache and masks (llm_state.py) and
    the grid's buffers.

    `begin` writes one run's prompt, uniforms, edit masks and settings into the buffers; `prefill` runs
    the prompt; `advance(p)` (see the function) then produces position p's codes into `codes` and the
    LLM state for p + 1 into `hidden`."""

    def __init__(self, model, key: StepKey):
        super().__init__(model, key)
        R, L = key.rows, key.length
        B, D, H = R // 2, model.config.quantizer.depth, model.config.llm.hidden_size
        device = torch.device(key.device)
        self.hidden = torch.zeros(R, H, dtype=key.dtype, device=device)  # LLM state for the next position
        self.uniforms = torch.zeros(B, L, D, dtype=torch.float32, device=device)  # (B, L, D): P <= L
        self.given = torch.zeros(B, L, D, dtype=torch.long, device=device)
        self.keep = torch.zeros(B, L, D, dtype=torch.bool, device=device)
        self.codes = torch.zeros(B, L, D, dtype=torch.long, device=device)
        self.cfg = torch.zeros((), dtype=torch.float32, device=device)
        self.knobs = torch.zeros(3, dtype=torch.float32, device=device)
        self.grid_indices = torch.arange(L, device=device)  # grid position p is passed as grid_indices[p], a 0-d tensor
        for buffer in (self.hidden, self.uniforms, self.given, self.keep, self.codes, self.cfg, self.knobs):
            torch._dynamo.mark_static_address(buffer)

    def begin(self, input_ids, attention_mask, uniforms, sampling, given=None, keep=None) -> None:
        """One run's inputs: prompt (R, T) ids and mask, uniforms (B, P, D), ImageSampling,
        and optionally the codes an edit forces: given (B, P, D) long where keep (B, P, D) bool."""
        super().begin(attention_mask)
        P = uniforms.shape[1]
        self.input_ids = input_ids.to(self.key_index.device)
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
        rope_ids = self.prompt_rope_ids()  # (R, T)
        if prefix is not None and prefix.shape[1]:
            steps = torch.arange(prefix.shape[1], device=rope_ids.device)
            embeds = torch.cat([embeds, prefix.to(embeds.dtype)], dim=1)  # (R, T + n, H)
            rope_ids = torch.cat([rope_ids, self.first_rope_id + steps], dim=1)
        hidden = super().prefill(model, embeds, rope_ids)  # (R, T + n, H)
        self.hidden.copy_(hidden[:, -1])


def code_inputs(model, codes: torch.Tensor) -> torch.Tensor:
    """The LLM inputs after positions whose codes are known: codes (B, n, D) -> (R, n, H), the projected
    sum of each position's code embeddings, the same for both CFG halves (they continue from the same codes).

    Computed with the original's exact ops and shapes (a cumsum over depth, then the projector on the
    non-contiguous (R, n, C) slice): on such a slice torch's Linear rounds the matmul before adding the
    bias, and in bf16 that single rounding step moves about a fifth of the values by an ulp, enough to
    flip near-tied codes later on."""
    rows = codes.repeat(2, 1, 1)  # (R, n, D)
    sums = torch.cumsum(model.vision.quantizer.embed_codes(rows), dim=-2)[:, :, -1, :]  # (R, n, C)
    return model.projector(sums)  # (R, n, H)


def advance(model, state: PositionState, p: torch.Tensor) -> None:
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
    hidden = state.step(model, code_inputs(model, codes[:, None]), p)  # (R, 1, H)
    state.hidden.copy_(hidden[:, -1])

"""The depth transformer: predicts the D residual codes of one grid position.

For one LLM hidden state h, depth step 0 sees `in_mlp_2(h)` and step d >= 1
sees `in_mlp_1(sum of the code embeddings chosen at depths < d)`, each plus a
learned depth position `pos_emb_d[d]`; a small causal pre-LN transformer turns
step d into logits over the codebook of depth d.

Parameter names equal the checkpoint's keys without their `rqtransformer.`
prefix (vision_tower/model.safetensors), so `load_state_dict` works strict.

Same math as the original (rqtransformer/modeling_rqtransformer.py and
attention.py), with one change of method, not of result: `generate` keeps a
KV cache over the D depth steps, where the original re-runs the transformer
from scratch at every step. Rounding follows the original's too: in bf16 the
cached steps give bit-identical logits to the original's from-scratch
recomputation (see `generate` for the one place where that needs care).

Vocabulary of the shape comments: B images, R = 2B rows (conditional, then
unconditional), N positions of any batch, D depth, E depth width, H LLM hidden
size, C code width, V codes per codebook.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoint.config import DepthSpec
from ..errors import InputError

EmbedCodes = Callable[[torch.Tensor], torch.Tensor]  # codes (..., D) -> per-depth embeddings (..., D, C)
SampleCodes = Callable[[torch.Tensor, int], torch.Tensor]  # guided logits (B, V), depth d -> codes (B,) int64


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, as the original: u + cfg * (c - u) in the logits' dtype.
    cond, uncond: (B, V), the conditional and unconditional rows' logits -> guided (B, V).

    A tensor cfg (the compiled step's, so that a new scale does not recompile) multiplies
    in float32 and rounds to the logits' dtype, which is what torch does with a Python
    float: both give the same bits."""
    if isinstance(cfg, torch.Tensor):
        return uncond + (cfg * (cond - uncond).float()).to(cond.dtype)
    return uncond + cfg * (cond - uncond)


class DepthAttention(nn.Module):
    """Causal multi-head self-attention over the depth axis."""

    def __init__(self, embed_dim: int, n_head: int):
        super().__init__()
        if embed_dim % n_head:
            raise InputError(f"depth transformer width {embed_dim} is not divisible by its {n_head} heads")
        self.n_head = n_head
        self.head_dim = embed_dim // n_head
        # as the original: the key is scaled, not the scores (q @ (k^T * 1/sqrt(d)))
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.key = nn.Linear(embed_dim, embed_dim)
        self.query = nn.Linear(embed_dim, embed_dim)
        self.value = nn.Linear(embed_dim, embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (..., E) -> (..., heads, head_dim)
        return x.unflatten(-1, (self.n_head, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All depth positions at once. x: (N, T, E) -> (N, T, E)."""
        T = x.shape[1]
        q = self._heads(self.query(x)).transpose(1, 2)  # (N, heads, T, hd)
        k = self._heads(self.key(x)).transpose(1, 2)  # (N, heads, T, hd)
        v = self._heads(self.value(x)).transpose(1, 2)  # (N, heads, T, hd)
        scores = q @ (k.transpose(-2, -1) * self.scale)  # (N, heads, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        # as the original: softmax in the model dtype
        y = F.softmax(scores, dim=-1) @ v  # (N, heads, T, hd)
        return self.proj(y.transpose(1, 2).flatten(-2))

    def step(self, x: torch.Tensor, cache: torch.Tensor, d: int) -> torch.Tensor:
        """Depth position d only, attending to positions 0..d through the cache.

        x: (R, E); cache: (2, R, heads, D, hd), keys stored already scaled;
        position d is written here. Returns (R, E).
        """
        q = self._heads(self.query(x)).unsqueeze(-2)  # (R, heads, 1, hd)
        cache[0, :, :, d] = self._heads(self.key(x)) * self.scale
        cache[1, :, :, d] = self._heads(self.value(x))
        keys = cache[0, :, :, : d + 1]  # (R, heads, d+1, hd)
        values = cache[1, :, :, : d + 1]  # (R, heads, d+1, hd)
        # the query is the last position, so the causal mask hides nothing here
        scores = q @ keys.transpose(-2, -1)  # (R, heads, 1, d+1)
        y = F.softmax(scores, dim=-1) @ values  # (R, heads, 1, hd)
        return self.proj(y.flatten(-3))


class DepthBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, embed_dim: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.attn = DepthAttention(embed_dim, n_head)
        # as the original: exact (erf) GELU, 4x width; index 1 holds no weights, so keys are mlp.0 / mlp.2
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.GELU(),
            nn.Linear(4 * embed_dim, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, D, E), every depth at once -> (N, D, E)."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def step(self, x: torch.Tensor, cache: torch.Tensor, d: int) -> torch.Tensor:
        """Depth position d only: x (R, E); cache: (2, R, heads, D, hd), this block's keys and values,
        position d written here -> (R, E)."""
        x = x + self.attn.step(self.ln1(x), cache, d)
        return x + self.mlp(self.ln2(x))


class DepthBlockStack(nn.Module):
    def __init__(self, spec: DepthSpec):
        super().__init__()
        self.blocks = nn.ModuleList(DepthBlock(spec.embed_dim, spec.n_head) for _ in range(spec.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def step(self, x: torch.Tensor, cache: torch.Tensor, d: int) -> torch.Tensor:
        """x: (R, E); cache: (n_layer, 2, R, heads, D, hd)."""
        for layer, block in enumerate(self.blocks):
            x = block.step(x, cache[layer], d)
        return x


class DepthTransformer(nn.Module):
    def __init__(self, spec: DepthSpec):
        super().__init__()
        self.spec = spec
        self.in_mlp_1 = nn.Linear(spec.code_dim, spec.embed_dim)  # summed code embeddings -> E
        self.in_mlp_2 = nn.Linear(spec.llm_dim, spec.embed_dim)  # LLM hidden state -> E
        self.head_transformer = DepthBlockStack(spec)
        self.pos_emb_d = nn.Parameter(torch.zeros(1, spec.depth, spec.embed_dim))
        self.classifier_mlp = nn.Sequential(
            OrderedDict(
                [
                    ("layer_norm", nn.LayerNorm(spec.embed_dim)),
                    ("linear", nn.Linear(spec.embed_dim, spec.vocab_size)),
                ]
            )
        )

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if hidden.shape[-1] != self.spec.llm_dim:
            raise InputError(
                f"the depth transformer takes LLM hidden states of width {self.spec.llm_dim}, got shape {tuple(hidden.shape)}"
            )

    @staticmethod
    def _running_sums(codes: torch.Tensor, embed_codes: EmbedCodes) -> torch.Tensor:
        """codes (N, D) -> running code-embedding sums (N, D, C); row d holds depths 0..d.

        As the original: torch.cumsum in the model dtype, not repeated additions,
        which round differently in bf16.
        """
        return torch.cumsum(embed_codes(codes), dim=-2)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor, embed_codes: EmbedCodes) -> torch.Tensor:
        """Teacher-forced logits of every depth given the true codes.

        hidden: (N, H) (any leading shape); codes: (N, D) int64 with the same
        leading shape. Returns (N, D, V); depth d sees hidden and codes[:, :d].
        """
        self._check_hidden(hidden)
        lead = hidden.shape[:-1]
        D = self.spec.depth
        if codes.shape != (*lead, D):
            raise InputError(f"codes should have shape {(*lead, D)} to go with hidden {tuple(hidden.shape)}, got {tuple(codes.shape)}")
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
        codes = codes.reshape(-1, D)  # (N, D)
        body = self.in_mlp_2(hidden).unsqueeze(1)  # (N, 1, E)
        context = self.in_mlp_1(self._running_sums(codes, embed_codes))  # (N, D, E)
        x = torch.cat([body, context[:, :-1]], dim=1) + self.pos_emb_d  # (N, D, E)
        logits = self.classifier_mlp(self.head_transformer(x))  # (N, D, V)
        return logits.reshape(*lead, D, -1)

    @torch.no_grad()
    def generate(
        self,
        hidden: torch.Tensor,
        embed_codes: EmbedCodes,
        cfg: float | torch.Tensor,
        sample: SampleCodes,
        given: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick the D codes of one grid position for B images under classifier-free guidance.

        hidden: (R, H), R = 2B rows: the B conditional rows, then the B
        unconditional ones. `sample(guided, d)` maps the guided logits of depth d
        (B, V), in the model dtype, to codes (B,). Editing: where `keep` (B, D)
        bool is set, the code is `given` (B, D) instead of the sample (which is
        still drawn, so shapes and draws stay the same), and the forced code is
        what later depths see. Shapes are fixed and nothing
        synchronises with the host (the depth loop is over a Python int and is
        unrolled when traced), so the generation step that calls this is compiled
        as one graph and, on CUDA, replayed as a CUDA graph (decoding/position_step.py).

        Returns codes (B, D) int64 and their summed code embedding (B, C), which
        is what the LLM receives next (through the projector), for both halves.
        """
        self._check_hidden(hidden)
        R = hidden.shape[0]
        if hidden.dim() != 2 or R % 2:
            raise InputError(
                f"generate takes (2B, {self.spec.llm_dim}) hidden states, conditional rows then unconditional, "
                f"got shape {tuple(hidden.shape)}"
            )
        B, D = R // 2, self.spec.depth
        attn = self.head_transformer.blocks[0].attn
        cache = hidden.new_empty(self.spec.n_layer, 2, R, attn.n_head, D, attn.head_dim)  # written by index
        codes = torch.zeros(R, D, dtype=torch.long, device=hidden.device)  # (R, D), same codes in both halves

        x = self.in_mlp_2(hidden)  # (R, E)
        for d in range(D):
            if d > 0:
                # running sum of depths < d; later entries of `codes` are not read by the prefix sum
                sums = self._running_sums(codes, embed_codes)[:, d - 1]  # (R, C)
                # as the original's generate: it feeds in_mlp_1 a non-contiguous slice, for which
                # torch's linear rounds the matmul before adding the bias (no fused addmm); in bf16
                # that moves about a quarter of these values by an ulp, and with them near-ties
                x = F.linear(sums, self.in_mlp_1.weight) + self.in_mlp_1.bias  # (R, E)
            x = x + self.pos_emb_d[0, d]
            logits = self.classifier_mlp(self.head_transformer.step(x, cache, d))  # (R, V)
            guided = guide(logits[:B], logits[B:], cfg)  # (B, V)
            code = sample(guided, d)  # (B,)
            if keep is not None:
                code = torch.where(keep[:, d], given[:, d], code)
            codes[:, d] = code.repeat(2)

        feature_sum = self._running_sums(codes[:B], embed_codes)[:, -1]  # (B, C)
        return codes[:B], feature_sum

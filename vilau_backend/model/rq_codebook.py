"""Residual quantizer: D codebooks applied to successive residuals of the SigLIP features.

State-dict keys as the checkpoint stores them (prefix `rqvaesiglip.quantizer.`):
`codebooks.{d}.weight` of shape (n_embed + 1, C); the last row is a padding row
that is never chosen. With `shared_codebook` only `codebooks.0.*` is stored and
every depth uses it. The EMA buffers (`cluster_size_ema`, `embed_ema`) are
training state and are not loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.config import QuantizerSpec


class ResidualQuantizer(nn.Module):
    def __init__(self, spec: QuantizerSpec):
        super().__init__()
        self.spec = spec
        n_books = 1 if spec.shared_codebook else spec.depth
        self.codebooks = nn.ModuleList(
            nn.Embedding(spec.n_embed + 1, spec.embed_dim, padding_idx=spec.n_embed) for _ in range(n_books)
        )

    def codebook(self, d: int) -> nn.Embedding:
        return self.codebooks[0 if self.spec.shared_codebook else d]

    @torch.no_grad()
    def quantize(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-code search on successive residuals.

        features: (B, h, w, C) in the model dtype.
        Returns codes (B, h, w, D) int64 and z_q (B, h, w, C), the sum of the chosen codes.
        """
        residual = features.clone()
        quant_sum = torch.zeros_like(features)
        codes = []
        for d in range(self.spec.depth):
            weight = self.codebook(d).weight[:-1]  # (n_embed, C): the padding row is never a candidate
            code = _nearest_code(residual, weight)
            quant = self.codebook(d)(code)
            residual.sub_(quant)
            quant_sum.add_(quant)
            codes.append(code)
        # as the original: z_q = x + (q - x), which in bf16 is not bit-identical to q itself
        z_q = features + (quant_sum - features)
        return torch.stack(codes, dim=-1), z_q

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-depth code embeddings. codes: (..., D) -> (..., D, C)."""
        if self.spec.shared_codebook:
            return self.codebooks[0](codes)
        return torch.stack([self.codebooks[d](codes[..., d]) for d in range(codes.shape[-1])], dim=-2)

    def codes_to_features(self, codes: torch.Tensor) -> torch.Tensor:
        """Summed code embedding, the decoder's input. codes: (..., D) -> (..., C)."""
        return self.embed_codes(codes).sum(dim=-2)


def _nearest_code(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmin_k |x|^2 + |c_k|^2 - 2 x.c_k, computed as the original does (one addmm in the
    model dtype) so that near-ties resolve the same way; argmin keeps the first index."""
    flat = inputs.reshape(-1, inputs.shape[-1])  # (N, C)
    codebook_t = weight.t()  # (C, K)
    distances = torch.addmm(
        flat.pow(2).sum(dim=1, keepdim=True) + codebook_t.pow(2).sum(dim=0, keepdim=True),
        flat,
        codebook_t,
        alpha=-2.0,
    )
    return distances.argmin(dim=-1).reshape(inputs.shape[:-1])

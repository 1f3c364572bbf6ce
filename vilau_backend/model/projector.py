"""The multimodal projector: vision features (.., C) -> LLM embeddings (.., H).

Module names match `mm_projector/model.safetensors`: `layers.0`, `layers.2`, ...
for 'mlpNx_gelu' (Linear, then GELU + Linear N-1 times), `layers` for 'linear'.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.config import ProjectorSpec


class Projector(nn.Module):
    def __init__(self, spec: ProjectorSpec):
        super().__init__()
        self.spec = spec
        if spec.kind == "linear":
            self.layers = nn.Linear(spec.in_dim, spec.out_dim)
        else:
            modules: list[nn.Module] = [nn.Linear(spec.in_dim, spec.out_dim)]
            for _ in range(spec.mlp_depth - 1):
                modules += [nn.GELU(), nn.Linear(spec.out_dim, spec.out_dim)]  # exact (erf) GELU, as the original
            self.layers = nn.Sequential(*modules)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

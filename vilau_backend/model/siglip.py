"""The SigLIP vision encoder, as VILA-U uses it: patch embeddings and all encoder
layers but the last. transformers' own SigLIP modules do the work; the last layer,
the post-layernorm, the pooling head and the text tower are never built.

Module names match the checkpoint keys under `rqvaesiglip.siglip_model.vision_model.`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionEmbeddings

from ..checkpoint.config import SiglipVisionSpec


def _hf_config(spec: SiglipVisionSpec) -> SiglipVisionConfig:
    config = SiglipVisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers_used,
        num_attention_heads=spec.num_attention_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=spec.num_channels,
        hidden_act=spec.hidden_act,
        layer_norm_eps=spec.layer_norm_eps,
        attention_dropout=spec.attention_dropout,
    )
    # eager attention upcasts the softmax to float32, as the original's SigLIP does
    config._attn_implementation = "eager"
    return config


class SiglipFeatureEncoder(nn.Module):
    def __init__(self, spec: SiglipVisionSpec):
        super().__init__()
        self.spec = spec
        config = _hf_config(spec)
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, 3, S, S) normalised to -1..1 -> features (B, h, w, C)."""
        hidden = self.embeddings(pixel_values)  # (B, h*w, C)
        hidden = self.encoder(inputs_embeds=hidden).last_hidden_state
        b, n, c = hidden.shape
        grid = self.spec.grid
        return hidden.reshape(b, grid, grid, c)

"""The pixel decoder: summed code embeddings (B, h, w, C) -> images.

A taming-style conv decoder, as the original's rqvaesiglip/modules.py, with
module names equal to the checkpoint keys under `rqvaesiglip.` (`post_quant_conv.*`,
`decoder.*`). Unlike the original, which hard-casts to bfloat16 inside its
upsampling (so it cannot run in float32), every op here stays in the dtype of
the weights; in bfloat16 the result is the same because nearest upsampling is
exact in any dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import DecoderSpec


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        q = self.q(h).reshape(b, c, height * width).transpose(1, 2)  # (B, N, c)
        k = self.k(h).reshape(b, c, height * width)  # (B, c, N)
        v = self.v(h).reshape(b, c, height * width)  # (B, c, N)
        # as the original: scale after the product, softmax in the model dtype
        weights = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (B, N, N)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, height, width)  # (B, c, H, W)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResnetBlocks, optional attention, optional upsampling."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], upsample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if upsample is not None:
            self.upsample = upsample


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class ConvDecoder(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        n_levels = len(spec.ch_mult)
        channels = spec.ch * spec.ch_mult[-1]
        resolution = spec.resolution // 2 ** (n_levels - 1)
        self.conv_in = nn.Conv2d(spec.z_channels, channels, 3, padding=1)
        self.mid = _Mid(channels)
        levels: list[_Level] = []
        for level in reversed(range(n_levels)):
            out_channels = spec.ch * spec.ch_mult[level]
            blocks, attns = [], []
            for _ in range(spec.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, out_channels))
                channels = out_channels
                if resolution in spec.attn_resolutions:
                    attns.append(AttnBlock(channels))
            upsample = None
            if level != 0:
                upsample = Upsample(channels)
                resolution *= 2
            levels.insert(0, _Level(blocks, attns, upsample))
        # stored finest-first (up.0 is full resolution) and run coarsest-first
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, spec.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, z_channels, h, w) -> pixels (B, out_ch, h * 2**L, w * 2**L), L = len(ch_mult) - 1
        upsamplings (16x16 -> 256x256 for the 256 px model), about -1..1."""
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):  # coarsest first
            for i, block in enumerate(level.block):
                h = block(h)  # (B, ch * ch_mult[level], ...)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # twice the height and width
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)


class PixelDecoder(nn.Module):
    """post_quant_conv + ConvDecoder, with the optional latent resize of `decoder_latent_shape`."""

    def __init__(self, spec: DecoderSpec, code_dim: int):
        super().__init__()
        self.spec = spec
        self.post_quant_conv = nn.Conv2d(code_dim, spec.z_channels, 1)
        self.decoder = ConvDecoder(spec)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, h, w, C) summed code embeddings -> raw decoder output (B, 3, H, W), about -1..1."""
        z = features.permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)
        if self.spec.latent_shape is not None:
            # as the original: bilinear resize computed in float32
            z = F.interpolate(z.float(), size=self.spec.latent_shape, mode="bilinear", align_corners=False).to(features.dtype)
        return self.decoder(self.post_quant_conv(z))

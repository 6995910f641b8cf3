"""Decoder half of the LDM KL-f8 autoencoder (`libs/autoencoder.py` in thu-ml/unidiffuser).

latent z [B, 4, h, w] -> image [B, 3, 8h, 8w] in [-1, 1] (before clamping). Parameter names
equal `autoencoder_kl.pth`'s `decoder.*` and `post_quant_conv.*`; its encoder half is not needed
for text-to-image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import groupnorm
from .config import VAEDecoderConfig


class GroupNorm(nn.GroupNorm):
    """GroupNorm, optionally followed by SiLU (every GroupNorm of the decoder but the mid
    attention's is). With `fused` set, CUDA inputs go through the plugin's fp32-accumulating
    kernel (`plugin/`), which keeps fp16 accurate and saves a pass over the activations."""

    fused = False

    def __init__(self, cfg: VAEDecoderConfig, channels: int, silu: bool):
        super().__init__(cfg.num_groups, channels, eps=cfg.eps)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda and groupnorm.available():
            return groupnorm.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(x) if self.silu else x


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEDecoderConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = GroupNorm(cfg, in_channels, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(cfg, out_channels, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, cfg: VAEDecoderConfig, channels: int):
        super().__init__()
        self.norm = GroupNorm(cfg, channels, silu=False)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)            # scale C**-0.5, as the original
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEDecoderConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cfg, block_in, block_in)
        self.mid.attn_1 = AttnBlock(cfg, block_in)
        self.mid.block_2 = ResnetBlock(cfg, block_in, block_in)
        # up[i] runs at resolution level i; they execute from the last (lowest resolution) to up[0].
        up = []
        for i in reversed(range(levels)):
            level = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cfg, block_in, block_out))
                block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = GroupNorm(cfg, block_in, silu=True)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(self.norm_out(h))


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (what the sampler produces) -> image in [-1, 1] (unclamped)."""
        return self.decoder(self.post_quant_conv(z * (1.0 / self.cfg.scale_factor)))

"""Encoder half of the LDM KL-f8 autoencoder (`libs/autoencoder.py` in thu-ml/unidiffuser:
`Encoder`, `FrozenAutoencoderKL.encode_moments` and `.sample`), for the image-conditioned modes.

image x [B, 3, H, W] in [-1, 1] -> moments [B, 2*embed_dim, ~H/8, ~W/8] (mean | log-variance)
-> scaled latent z = scale_factor * (mean + std * noise). The noise is the caller's: the
original draws `randn_like(mean)` on the GPU; the pipeline draws it per image from a CPU
generator so results do not depend on the device or the batch. The original runs this in fp32
(`encode_moments` is called outside autocast).

Parameter names equal `autoencoder_kl.pth`'s `encoder.*` and `quant_conv.*`, so that file's
keys with those prefixes load strictly. The building blocks are the decoder's
(models/vae_decoder.py), including its GroupNorm with the fused fast path; the encoder adds only
the strided downsampling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEDecoderConfig
from .random_weights import randomize_
from .vae_decoder import AttnBlock, GroupNorm, ResnetBlock

KEY_PREFIXES = ("encoder.", "quant_conv.")


class Downsample(nn.Module):
    """3x3 convolution of stride 2 after padding one zero row/column at the bottom/right only
    (torch's symmetric padding would shift the sampling grid by half a pixel against the
    checkpoint's training)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEDecoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.out_ch, cfg.ch, 3, padding=1)
        # down[i] runs at resolution level i; num_res_blocks blocks each (the decoder has one
        # more per level). The original's per-level `attn` lists are empty for KL-f8
        # (attn_resolutions=[]) and hold no parameters, so they are left out.
        block_in = cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cfg, block_in, cfg.ch * mult))
                block_in = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cfg, block_in, block_in)
        self.mid.attn_1 = AttnBlock(cfg, block_in)
        self.mid.block_2 = ResnetBlock(cfg, block_in, block_in)
        self.norm_out = GroupNorm(cfg, block_in, silu=True)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)   # double_z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(self.norm_out(h))


class VAEEncoder(nn.Module):
    def __init__(self, cfg: VAEDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1], NCHW -> [B, 2*embed_dim, h, w]: mean then log-variance along dim 1
        (the original's `encode_moments`)."""
        return self.quant_conv(self.encoder(x))

    forward = moments

    def sample(self, moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The scaled latent the UViT works on: (mean + exp(logvar / 2) * noise) * scale_factor,
        logvar clamped to [-30, 20] as in the original. `noise` ~ N(0, 1) of the mean's shape."""
        mean, logvar = moments.chunk(2, dim=1)
        if noise.shape != mean.shape:
            raise ValueError(f"noise must have the latent mean's shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (mean + std * noise.to(mean)) * self.cfg.scale_factor


def original_state_dict(autoencoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of `autoencoder_kl.pth` (the whole autoencoder) that VAEEncoder loads."""
    return {k: v for k, v in autoencoder.items() if k.startswith(KEY_PREFIXES)}


def random_original(cfg: VAEDecoderConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under `autoencoder_kl.pth`'s `encoder.*` / `quant_conv.*` names (healthy
    activations: see models/random_weights.py)."""
    return randomize_(VAEEncoder(cfg), generator).state_dict()

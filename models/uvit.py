"""UViT noise predictor of UniDiffuser-v1 (`libs/uvit_multi_post_ln_v1.py` in thu-ml/unidiffuser).

A post-LayerNorm transformer over one sequence that holds every modality:

    [t_img, t_text, data_type, text x 77, clip_img, image patches]

with U-Net-like long skips: the k-th out-block concatenates the output of the (depth/2 - k)-th
in-block and projects it back with `skip_linear`. Parameter names equal the original
checkpoint's (`uvit_v1.pth`), so its state dict loads as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UViTConfig
from .fused_norm import LayerNorm


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    # Fast path only: bias + GELU in the fc1 GEMM's cuBLASLt epilogue, which saves a full pass
    # over the 4x-wide hidden activations. On CUDA that epilogue computes GELU's tanh approximation
    # (|difference| < 5e-4, under fp16's rounding at those magnitudes; bench.py reports the error).
    fused_gelu = False

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu and isinstance(self.fc1, nn.Linear):   # not when fc1 runs in fp8 (models/fp8.py)
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], -1))
        return self.fc2(F.gelu(self.fc1(x)))


class SkipLinear(nn.Linear):
    """skip_linear(cat([x, skip], -1)). With `split` (fast path only) it runs as two GEMMs over
    the two column halves of the weight (views, no copy) accumulating into one output, so the
    2x-wide concatenation is never written and read back."""
    split = False

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return super().forward(torch.cat([x, skip], dim=-1))
        D = x.shape[-1]
        out = torch.addmm(self.bias, x.reshape(-1, D), self.weight[:, :D].t())
        out.addmm_(skip.reshape(-1, D), self.weight[:, D:].t())
        return out.view(*x.shape[:-1], -1)


class Block(nn.Module):
    """Post-LN block. Out-blocks (skip=True) first merge the long skip: norm1(skip_linear([x, skip])).
    The norms take the residual as their second argument (fused into one kernel on the fast path)."""

    def __init__(self, cfg: UViTConfig, skip: bool = False):
        super().__init__()
        dim = cfg.embed_dim
        self.skip_linear = SkipLinear(2 * dim, dim) if skip else None
        self.norm1 = LayerNorm(dim) if skip else None
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, dim * cfg.mlp_ratio)
        self.norm3 = LayerNorm(dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(x, skip))
        x = self.norm2(x, self.attn(x))
        return self.norm3(x, self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class UViT(nn.Module):
    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        # v1 has mlp_time_embed=False: the time tokens are the raw sinusoidal embeddings
        # (time_img_embed / time_text_embed are identities and hold no weights).
        self.text_embed = nn.Linear(cfg.text_dim, D)
        self.text_out = nn.Linear(D, cfg.text_dim)
        self.clip_img_embed = nn.Linear(cfg.clip_img_dim, D)
        self.clip_img_out = nn.Linear(D, cfg.clip_img_dim)
        self.token_embedding = nn.Embedding(2, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D))
        self.pos_embed_token = nn.Parameter(torch.zeros(1, 1, D))
        self.in_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth // 2))
        self.mid_block = Block(cfg)
        self.out_blocks = nn.ModuleList(Block(cfg, skip=True) for _ in range(cfg.depth // 2))
        self.norm = LayerNorm(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_chans)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """pos_embed with the data-type token's entry inserted after the two time tokens; the
        patch part bilinearly resized when the latent grid (h, w) is not the trained one."""
        cfg = self.cfg
        pos = torch.cat([self.pos_embed[:, :2], self.pos_embed_token, self.pos_embed[:, 2:]], dim=1)
        g = cfg.img_size // cfg.patch_size
        if (h, w) == (g, g):
            return pos
        others, patches = pos.split([pos.shape[1] - cfg.num_patches, cfg.num_patches], dim=1)
        patches = patches.transpose(1, 2).reshape(1, -1, g, g)
        patches = F.interpolate(patches, size=(h, w), mode="bilinear").flatten(2).transpose(1, 2)
        return torch.cat([others, patches], dim=1)

    def forward(self, img, clip_img, text, t_img, t_text, data_type):
        """img [B, C, H, W], clip_img [B, 1, clip_img_dim], text [B, 77, text_dim], t_img and
        t_text [B] (fractional allowed), data_type [B] int. Returns (img_out, clip_img_out, text_out)."""
        cfg = self.cfg
        B, _, H, W = img.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent height and width must be multiples of the patch size {p}, got {H}x{W}")
        h, w = H // p, W // p
        dtype = self.pos_embed.dtype
        x = torch.cat([
            timestep_embedding(t_img, cfg.embed_dim).to(dtype)[:, None],
            timestep_embedding(t_text, cfg.embed_dim).to(dtype)[:, None],
            self.token_embedding(data_type)[:, None],
            self.text_embed(text),
            self.clip_img_embed(clip_img),
            self.patch_embed(img),
        ], dim=1)
        x = x + self.position_embedding(h, w)

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.norm(x)

        T = text.shape[1]
        _, text_out, clip_img_out, img_out = x.split([3, T, 1, h * w], dim=1)
        img_out = self.decoder_pred(img_out)                 # [B, h*w, p*p*C], (p1 p2 C) order
        img_out = img_out.view(B, h, w, p, p, cfg.in_chans).permute(0, 5, 1, 3, 2, 4).reshape(B, cfg.in_chans, H, W)
        return img_out, self.clip_img_out(clip_img_out), self.text_out(text_out)

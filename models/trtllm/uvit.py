"""TensorRT-LLM network of `models/uvit.py` (UniDiffuser-v1 UViT, post-LN, long skips).

One engine call runs the whole CFG batch (conditional and unconditional rows, 2B rows). Inputs:
img fp16 [N, 4, h, w], clip_img fp16 [N, 1, clip_img_dim], text fp16 [N, 77, text_dim],
t_img / t_text fp32 [N] (fractional timesteps), data_type int32 [N]. Outputs img_out, clip_img_out,
text_out (fp16). The latent size (h, w) is fixed per engine: `functional.interpolate`, which
resizes the patch positional embedding for non-trained sizes, needs static shapes.

The sinusoidal timestep embedding is computed in the network in fp32, as the reference does.
Attention goes through the fused bert_attention plugin (as tensorrt_llm/models/dit/model.py's
BertAttention does) when the build enables it, else plain ops with fp32 softmax.
"""
from __future__ import annotations

import math

import numpy as np
import tensorrt as trt
from tensorrt_llm._common import default_net
from tensorrt_llm.functional import (Tensor, bert_attention, concat, constant, cos, expand, interpolate,
                                     shape, sin, slice, unsqueeze, view)
from tensorrt_llm.layers import Conv2d, Embedding, Linear
from tensorrt_llm.module import Module, ModuleList
from tensorrt_llm.parameter import Parameter

from models.config import UViTConfig

from .common import DTYPE, LayerNorm, batch_input, gelu_erf, merge_heads, sdpa, split_heads


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos | sin] of t * freqs, fp32 [N, dim], as models/uvit.py computes it."""
    if dim % 2:
        raise ValueError(f"UViT embed_dim must be even for the timestep embedding, got {dim}")
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half)).astype(np.float32)
    args = unsqueeze(t, 1) * constant(freqs[None])
    return concat([cos(args), sin(args)], dim=1)


class Attention(Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias, dtype=DTYPE)
        self.proj = Linear(dim, dim, dtype=DTYPE)

    def forward(self, x: Tensor, input_lengths: Tensor) -> Tensor:
        qkv = self.qkv(x)                 # [N, L, 3*C], q | k | v, heads inside each: the plugin's layout
        if default_net().plugin_config.bert_attention_plugin:
            ctx = bert_attention(qkv, input_lengths, self.num_heads, self.head_dim, q_scaling=1.0)
        else:
            C = self.num_heads * self.head_dim
            q, k, v = (split_heads(t, self.num_heads, self.head_dim) for t in qkv.split([C, C, C], dim=2))
            ctx = merge_heads(sdpa(q, k, v, self.head_dim ** -0.5), self.num_heads, self.head_dim)
        return self.proj(ctx)


class Mlp(Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden, dtype=DTYPE)
        self.fc2 = Linear(hidden, dim, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu_erf(self.fc1(x)))


class Block(Module):
    """Post-LN block; out-blocks first merge the long skip: norm1(skip_linear([x, skip]))."""

    def __init__(self, cfg: UViTConfig, skip: bool = False):
        super().__init__()
        dim = cfg.embed_dim
        self.skip_linear = Linear(2 * dim, dim, dtype=DTYPE) if skip else None
        self.norm1 = LayerNorm(dim) if skip else None
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, dim * cfg.mlp_ratio)
        self.norm3 = LayerNorm(dim)

    def forward(self, x: Tensor, input_lengths: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(concat([x, skip], dim=2)))
        x = self.norm2(x + self.attn(x, input_lengths))
        return self.norm3(x + self.mlp(x))


class PatchEmbed(Module):
    def __init__(self, cfg: UViTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=(p, p), stride=(p, p), dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)      # NCHW -> N, h*w, C


class UViT(Module):
    def __init__(self, cfg: UViTConfig, latent_height: int, latent_width: int):
        super().__init__()
        p = cfg.patch_size
        if latent_height % p or latent_width % p:
            raise ValueError(f"latent size {latent_height}x{latent_width} must be a multiple of the patch size {p}")
        self.cfg, self.latent_height, self.latent_width = cfg, latent_height, latent_width
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.text_embed = Linear(cfg.text_dim, D, dtype=DTYPE)
        self.text_out = Linear(D, cfg.text_dim, dtype=DTYPE)
        self.clip_img_embed = Linear(cfg.clip_img_dim, D, dtype=DTYPE)
        self.clip_img_out = Linear(D, cfg.clip_img_dim, dtype=DTYPE)
        self.token_embedding = Embedding(2, D, dtype=DTYPE)
        self.pos_embed = Parameter(shape=(1, cfg.num_tokens, D), dtype=DTYPE)
        self.pos_embed_token = Parameter(shape=(1, 1, D), dtype=DTYPE)
        self.in_blocks = ModuleList([Block(cfg) for _ in range(cfg.depth // 2)])
        self.mid_block = Block(cfg)
        self.out_blocks = ModuleList([Block(cfg, skip=True) for _ in range(cfg.depth // 2)])
        self.norm = LayerNorm(D)
        self.decoder_pred = Linear(D, p * p * cfg.in_chans, dtype=DTYPE)

    def position_embedding(self, h: int, w: int) -> Tensor:
        """pos_embed with pos_embed_token inserted after the two time tokens; the patch part
        bilinearly resized (half-pixel, as F.interpolate(align_corners=False)) when (h, w) is
        not the trained grid."""
        cfg, D = self.cfg, self.cfg.embed_dim
        n = cfg.num_tokens
        table = self.pos_embed.value
        pos = concat([slice(table, [0, 0, 0], [1, 2, D]), self.pos_embed_token.value,
                      slice(table, [0, 2, 0], [1, n - 2, D])], dim=1)
        g = cfg.img_size // cfg.patch_size
        if (h, w) == (g, g):
            return pos
        n_other = n + 1 - cfg.num_patches
        others = slice(pos, [0, 0, 0], [1, n_other, D])
        patches = view(slice(pos, [0, n_other, 0], [1, g * g, D]), [1, g, g, D]).permute([0, 3, 1, 2])
        patches = interpolate(patches, size=[h, w], mode="bilinear")
        patches = view(patches.permute([0, 2, 3, 1]), [1, h * w, D])
        return concat([others, patches], dim=1)

    def forward(self, img, clip_img, text, t_img, t_text, data_type):
        cfg, D, p, C = self.cfg, self.cfg.embed_dim, self.cfg.patch_size, self.cfg.in_chans
        H, W = self.latent_height, self.latent_width
        h, w = H // p, W // p
        T = cfg.num_text_tokens
        x = concat([
            unsqueeze(timestep_embedding(t_img, D).cast(DTYPE), 1),
            unsqueeze(timestep_embedding(t_text, D).cast(DTYPE), 1),
            unsqueeze(self.token_embedding(data_type), 1),
            self.text_embed(text),
            self.clip_img_embed(clip_img),
            self.patch_embed(img),
        ], dim=1)
        x = x + self.position_embedding(h, w)

        # Every row has the full sequence: the plugin's lengths are the constant L (as DiT does).
        L = 3 + T + 1 + h * w
        input_lengths = expand(constant(np.array([L], dtype=np.int32)), unsqueeze(shape(x, 0), 0))

        skips = []
        for blk in self.in_blocks:
            x = blk(x, input_lengths)
            skips.append(x)
        x = self.mid_block(x, input_lengths)
        for blk in self.out_blocks:
            x = blk(x, input_lengths, skips.pop())
        x = self.norm(x)

        N = shape(x, 0)
        text_out = slice(x, [0, 3, 0], concat([N, T, D]))
        clip_img_out = slice(x, [0, 3 + T, 0], concat([N, 1, D]))
        img_out = self.decoder_pred(slice(x, [0, 4 + T, 0], concat([N, h * w, D])))   # (p1 p2 C) order
        img_out = view(img_out, concat([N, h, w, p, p, C])).permute([0, 5, 1, 3, 2, 4])
        img_out = view(img_out, concat([N, C, H, W]))

        img_out.mark_output("img_out", DTYPE)
        clip_img_out = self.clip_img_out(clip_img_out)
        clip_img_out.mark_output("clip_img_out", DTYPE)
        text_out = self.text_out(text_out)
        text_out.mark_output("text_out", DTYPE)
        return img_out, clip_img_out, text_out

    def prepare_inputs(self, max_batch_size: int) -> dict:
        """max_batch_size counts engine rows: both CFG halves (2 x images)."""
        cfg = self.cfg
        fp16, B = trt.float16, max_batch_size
        return {
            "img": batch_input("img", fp16, [cfg.in_chans, self.latent_height, self.latent_width],
                               ["in_chans", "latent_height", "latent_width"], B),
            "clip_img": batch_input("clip_img", fp16, [1, cfg.clip_img_dim], ["one", "clip_img_dim"], B),
            "text": batch_input("text", fp16, [cfg.num_text_tokens, cfg.text_dim], ["num_text_tokens", "text_dim"], B),
            "t_img": batch_input("t_img", trt.float32, [], [], B),
            "t_text": batch_input("t_text", trt.float32, [], [], B),
            "data_type": batch_input("data_type", trt.int32, [], [], B),
        }

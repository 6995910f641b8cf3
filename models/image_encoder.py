"""CLIP ViT-B/32 image tower with its projection: OpenAI CLIP's `encode_image`, which the original
(sample_multi_v1.py, `clip.load("ViT-B/32")`) uses for the image-conditioned modes'
CLIP-image token: image [B, 3, 224, 224] -> [B, projection_dim] (512, not normalised). On CUDA
the original runs it in fp16 (clip.load keeps the fp16 weights there).

Parameter names are transformers' CLIPVisionModelWithProjection's (`vision_model.*`,
`visual_projection.weight`), as in the hub repo openai/clip-vit-base-patch32, the same weights
as OpenAI's ViT-B-32.pt in another layout. Like models/text_encoder.py the transformer is
written out (its MLP is the text encoder's); the difference is bidirectional attention, a class
token, and pre/post LayerNorms around the encoder.

`preprocess` is OpenAI CLIP's image transform (clip/clip.py `_transform`, torchvision on PIL).
tests/test_image_encoder.py pins both to transformers and to OpenAI's own model code.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import ImageEncoderConfig
from .random_weights import randomize_
from .text_encoder import ACTIVATIONS, CLIPMLP, CLIPAttention

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionAttention(CLIPAttention):
    """The text encoder's attention without the causal mask: every patch sees every patch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


class CLIPVisionLayer(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPVisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"image encoder hidden_act must be one of {', '.join(ACTIVATIONS)}, got {cfg.hidden_act!r}")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        D = cfg.hidden_size
        self.image_size = cfg.image_size
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.zeros(D))
        self.embeddings.patch_embedding = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.embeddings.position_embedding = nn.Embedding(cfg.num_positions, D)
        self.pre_layrnorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)      # (sic) transformers' name
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPVisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, S, S] (normalised) -> pooled class token [B, hidden_size]."""
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"image encoder expects {self.image_size} x {self.image_size} pixels "
                             f"(see preprocess), got {tuple(pixels.shape[-2:])}")
        e = self.embeddings
        x = e.patch_embedding(pixels.to(e.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = e.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.pre_layrnorm(torch.cat([cls, x], dim=1) + e.position_embedding.weight)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """`preprocess`ed images [B, 3, 224, 224] -> CLIP image embeddings [B, projection_dim]."""
        return self.visual_projection(self.vision_model(pixels))


def preprocess(images: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """PIL images -> [B, 3, size, size] float32, as OpenAI CLIP's transform: shortest side to
    `size` (PIL bicubic, long side int(size * long / short)), centre crop with torchvision's
    offsets (round half to even of the excess / 2), RGB, [0, 1], then CLIP's mean / std."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = []
    for img in images:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        # torchvision's CenterCrop uses Python's round(); transformers' processor floors instead,
        # which puts the crop one pixel left/up when the excess is 3 mod 4.
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size)).convert("RGB")
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        out.append((x - mean) / std)
    return torch.stack(out)


def original_state_dict(clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of openai/clip-vit-base-patch32's model.safetensors (a whole CLIPModel) that
    ImageEncoder loads: the vision tower and its projection, without the `position_ids` buffer
    that older exports carry."""
    return {k: v for k, v in clip.items()
            if (k.startswith("vision_model.") or k == "visual_projection.weight")
            and not k.endswith("embeddings.position_ids")}


def random_original(cfg: ImageEncoderConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under transformers' names (`vision_model.*`, `visual_projection.weight`)."""
    return randomize_(ImageEncoder(cfg), generator).state_dict()

"""Text encoder of UniDiffuser text-to-image: CLIP ViT-L/14's text transformer, then the caption
decoder's `encode_prefix` (Linear 768 -> 64), which maps CLIP's 77x768 features to the UViT's
77x64 text tokens.

CLIP's text transformer (Radford et al. 2021) is written out here rather than taken from
transformers: importing transformers' CLIP costs seconds on every start, and the network is
small. Parameter names: `text_model.*` as in openai/clip-vit-large-patch14 (transformers'
CLIPTextModel layout), `encode_prefix.*` as in `caption_decoder.pth` (without its DataParallel
`module.` prefix). tests/test_oracles.py pins it to transformers' CLIPTextModel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


def clip_text_config(cfg: TextEncoderConfig):
    """The transformers CLIPTextConfig of these fields (for writing originals and for peers)."""
    from transformers import CLIPTextConfig

    # Token ids of the CLIP BPE vocabulary; only the pooled output (unused here) reads eos.
    c = CLIPTextConfig(**cfg.clip_fields(), bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    c._attn_implementation = "sdpa"
    return c


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        D = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: causal self-attention, then the MLP, each added to the residual."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"text encoder hidden_act must be one of {', '.join(ACTIVATIONS)}, got {cfg.hidden_act!r}")
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> last hidden state [B, L, hidden_size]. No padding mask: like the
        original (FrozenCLIPEmbedder), padded positions are attended causally as tokens."""
        L = input_ids.shape[1]
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:L]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.encode_prefix = nn.Linear(cfg.hidden_size, cfg.prefix_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, 77] -> text features [B, 77, prefix_dim] (CLIP's last_hidden_state, projected)."""
        return self.encode_prefix(self.text_model(input_ids))

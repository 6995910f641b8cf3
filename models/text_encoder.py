"""Text encoder of UniDiffuser text-to-image: CLIP ViT-L/14's text transformer, then the caption
decoder's `encode_prefix` (Linear 768 -> 64), which maps CLIP's 77x768 features to the UViT's
77x64 text tokens.

Parameter names: `text_model.*` as in openai/clip-vit-large-patch14, `encode_prefix.*` as in
`caption_decoder.pth` (without its DataParallel `module.` prefix).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from .config import TextEncoderConfig


def clip_text_config(cfg: TextEncoderConfig) -> CLIPTextConfig:
    # Token ids of the CLIP BPE vocabulary; only the pooled output (unused here) reads eos.
    c = CLIPTextConfig(**cfg.clip_fields(), bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    c._attn_implementation = "sdpa"
    return c


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        clip = CLIPTextModel(clip_text_config(cfg))
        # transformers < 5 wraps the transformer in `.text_model`; 5.x is flat. Either way the
        # parameters are named text_model.* here, as in the hub checkpoint.
        self.text_model = getattr(clip, "text_model", clip)
        self.encode_prefix = nn.Linear(cfg.hidden_size, cfg.prefix_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, 77] -> text features [B, 77, prefix_dim] (CLIP's last_hidden_state, projected)."""
        hidden = self.text_model(input_ids=input_ids).last_hidden_state
        return self.encode_prefix(hidden)

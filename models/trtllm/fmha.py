"""When the UViT engine takes TensorRT-LLM's fused attention (the bert_attention plugin's context
FMHA kernels). No TensorRT here: the build script, and the tests on any machine, ask this
before anything of TensorRT-LLM is imported."""
from __future__ import annotations

from models.config import UViTConfig

# Head sizes the bert_attention plugin's fused (context FMHA) kernels cover; v1 has 64.
FMHA_HEAD_SIZES = (32, 40, 64, 80, 96, 104, 128, 160, 192, 256)


def use_fused_attention(cfg: UViTConfig) -> bool:
    """Heads that split embed_dim evenly, at a head size the fused kernels have."""
    return cfg.embed_dim % cfg.num_heads == 0 and cfg.embed_dim // cfg.num_heads in FMHA_HEAD_SIZES

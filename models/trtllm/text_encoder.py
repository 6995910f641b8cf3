"""TensorRT-LLM network of `models/text_encoder.py`: CLIP's text transformer + encode_prefix.

input_ids int32 [B, 77] -> text features fp16 [B, 77, prefix_dim]. Parameter names are the
converted `text_encoder.safetensors` names (text_model.*, encode_prefix.*). Causal self-attention
runs on plain TensorRT ops (the bert_attention plugin has no causal mask).
"""
from __future__ import annotations

import tensorrt as trt
from tensorrt_llm.functional import Tensor, quick_gelu, unsqueeze
from tensorrt_llm.layers import Embedding, Linear
from tensorrt_llm.module import Module, ModuleList

from models.config import TextEncoderConfig

from .common import DTYPE, LayerNorm, batch_input, causal_mask, merge_heads, sdpa, split_heads


class CLIPEmbeddings(Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=DTYPE)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=DTYPE)

    def forward(self, input_ids: Tensor) -> Tensor:
        # Positions are always 0..76: add the whole table instead of gathering it.
        return self.token_embedding(input_ids) + unsqueeze(self.position_embedding.weight.value, 0)


class CLIPAttention(Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj = Linear(d, d, dtype=DTYPE)
        self.k_proj = Linear(d, d, dtype=DTYPE)
        self.v_proj = Linear(d, d, dtype=DTYPE)
        self.out_proj = Linear(d, d, dtype=DTYPE)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = (split_heads(m(x), self.num_heads, self.head_dim) for m in (self.q_proj, self.k_proj, self.v_proj))
        ctx = sdpa(q, k, v, self.head_dim ** -0.5, mask)
        return self.out_proj(merge_heads(ctx, self.num_heads, self.head_dim))


class CLIPMLP(Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"text encoder: hidden_act {cfg.hidden_act!r} not supported (CLIP uses quick_gelu)")
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, dtype=DTYPE)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(Module):
    """Pre-LN: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        mask = causal_mask(self.cfg.max_position_embeddings)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)


class TextEncoder(Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.encode_prefix = Linear(cfg.hidden_size, cfg.prefix_dim, dtype=DTYPE)

    def forward(self, input_ids: Tensor) -> Tensor:
        text = self.encode_prefix(self.text_model(input_ids))
        text.mark_output("text", DTYPE)
        return text

    def prepare_inputs(self, max_batch_size: int) -> dict:
        ids = batch_input("input_ids", trt.int32, [self.cfg.max_position_embeddings], ["num_tokens"], max_batch_size)
        return {"input_ids": ids}

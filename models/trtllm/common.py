"""Building blocks shared by the engine networks.

Normalizations and attention softmax run in fp32 inside the fp16 engines: the PyTorch
reference in fp16 accumulates LayerNorm/GroupNorm/softmax statistics in fp32 too, and the
networks are built strongly typed (tensorrt_llm/builder.py: Builder.create_network), so every
cast is explicit here.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tensorrt as trt
from tensorrt_llm.functional import (Tensor, activation, cast, concat, constant, layer_norm,
                                     matmul, shape, softmax, view)
from tensorrt_llm.module import Module
from tensorrt_llm.parameter import Parameter

DTYPE = "float16"


class LayerNorm(Module):
    """nn.LayerNorm over the last dim; parameters `weight`, `bias` as in torch."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype: str = DTYPE):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = Parameter(shape=(dim,), dtype=dtype)
        self.bias = Parameter(shape=(dim,), dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = layer_norm(cast(x, "float32"), self.dim, cast(self.weight.value, "float32"),
                       cast(self.bias.value, "float32"), self.eps)
        return cast(y, x.dtype)


def gelu_erf(x: Tensor) -> Tensor:
    # functional.gelu is the tanh approximation (and ACT2FN's "gelu" maps to it); the UViT
    # (F.gelu) uses the exact erf form. The checkpoint config names it "gelu_erf"
    # (trtllm_checkpoint.UVIT_HIDDEN_ACT), after trt.ActivationType.GELU_ERF.
    return activation(x, trt.ActivationType.GELU_ERF)


def split_heads(x: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """[B, L, H*d] -> [B, H, L, d] (batch and length may be dynamic)."""
    x = view(x, concat([shape(x, 0), shape(x, 1), num_heads, head_dim]))
    return x.permute([0, 2, 1, 3])


def merge_heads(x: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """[B, H, L, d] -> [B, L, H*d]."""
    x = x.permute([0, 2, 1, 3])
    return view(x, concat([shape(x, 0), shape(x, 1), num_heads * head_dim]))


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v with fp32 scores and softmax, fp16 in and out.
    q, k, v: [B, H, L, d]; mask broadcastable to [B, H, L, L] (fp32, 0 or -inf)."""
    scores = matmul(cast(q, "float32"), cast(k, "float32"), transb=True) * scale
    if mask is not None:
        scores = scores + mask
    probs = cast(softmax(scores, dim=-1), v.dtype)
    return matmul(probs, v)          # matmul accumulates fp16 products in fp32 (use_fp32_acc)


def causal_mask(length: int) -> Tensor:
    m = np.triu(np.full((length, length), -np.inf, dtype=np.float32), k=1)
    return constant(m[None, None])


def batch_input(name: str, dtype, static_shape: list[int], dim_names: list[str], max_batch: int) -> Tensor:
    """A network input whose first dim is the (dynamic) batch, 1..max_batch; the rest static.
    Dimension ranges as in tensorrt_llm/functional.py Tensor(dim_range=...) / DiT.prepare_inputs.
    TensorRT tunes its tactics for the profile's opt shape: max_batch, the rows a full request
    runs at (for the UViT that is 2 x images, both CFG halves in one call, 50 times per image)."""
    opt = max_batch
    dims = OrderedDict([("batch_size", [[1, opt, max_batch]])])
    for n, s in zip(dim_names, static_shape):
        dims[n] = [[s, s, s]]
    return Tensor(name=name, dtype=dtype, shape=[-1, *static_shape], dim_range=dims)


def load_weights(module: Module, weights: dict[str, np.ndarray]) -> None:
    """Name-for-name copy of a TensorRT-LLM checkpoint into the network's parameters."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {type(module).__name__}: "
                         f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    for name, p in params.items():
        p.value = np.ascontiguousarray(weights[name])   # Parameter.value asserts the shape

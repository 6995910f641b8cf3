"""LayerNorm with the residual add fused in: norm(x + residual) in one pass over memory.

The UViT is post-LN, so every block ends in `norm(x + branch(x))`. Unfused at half precision
that is an add kernel (read two, write one) and a LayerNorm kernel (read one, write one); the
Triton kernel here reads x and the branch output once and writes only the normalised rows, with
the sum and the statistics in fp32 (so it is slightly *more* accurate than the unfused pair,
which rounds the sum to fp16 first). torch's LayerNorm kernel is also poorly occupied at these
shapes (~2 200 rows of 1 536); one program per row is not.

`LayerNorm` is nn.LayerNorm (same parameters, same names) whose forward takes the residual as a
second argument. Unless `fused` is set (the fast path's `make_fast` does) it computes exactly
what `nn.LayerNorm(x + residual)` did, so the fp32 reference is unchanged bit for bit. Triton is
optional: without it, or off CUDA, `add_layer_norm` falls back to torch.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

try:   # optional dependency of the fast path only; CPU installs do not have it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _add_layer_norm_kernel(X, R, W, B, Y, S, stride_x, stride_r, stride_y, stride_s, n_cols, eps,
                               HAS_R: tl.constexpr, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_R:
            x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_S:   # a pre-LN network carries the sum on as its residual stream
            tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=0) / n_cols
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


def available(device: torch.device | str = "cuda") -> bool:
    """Whether the Triton kernel runs on tensors of this device (any device under
    TRITON_INTERPRET=1, which is how the CPU tests exercise it)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, return_sum: bool = False):
    """layer_norm(x + residual) over the last dim, the sum and statistics in fp32, the result
    in x's dtype. residual may be None (a plain LayerNorm). return_sum: also the sum x + residual
    (in x's dtype), as (sum, normed)."""
    n = x.shape[-1]
    if not available(x.device):
        s = x.float() if residual is None else x.float() + residual.float()
        y = F.layer_norm(s, (n,), weight.float(), bias.float(), eps).to(x.dtype)
        return (s.to(x.dtype), y) if return_sum else y
    x2 = x.reshape(-1, n)
    r2 = x2 if residual is None else residual.reshape(-1, n)
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        x2, r2 = x2.contiguous(), r2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if return_sum else y
    block = triton.next_power_of_2(n)
    _add_layer_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, bias, y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), n, eps,
        HAS_R=residual is not None, HAS_S=return_sum, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return (s.view(x.shape), y.view(x.shape)) if return_sum else y.view(x.shape)


class LayerNorm(nn.LayerNorm):
    fused = False   # set on the fast path: the Triton kernel when it is available

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused and available(x.device):
            return add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        return super().forward(x if residual is None else x + residual)

"""fp8 (e4m3) linear layers for the UViT: opt-in, for throughput at large batch.

Weights are quantised once with one scale per output channel (amax of the row / 448); the
activations are quantised on the fly with one scale per token (row), and the GEMM runs in
`torch._scaled_mm` with both scale vectors applied in its epilogue (cuBLASLt's outer-vector
scaling on sm_90 with CUDA >= 12.9), bias included, output in the model's fp16/bf16.

Why `torch._scaled_mm` and not torchao's float8: it is the kernel torchao's rowwise recipe ends
in anyway, it is in torch (no new dependency), and the quantisation around it is ours to fuse:
one Triton pass per activation reads the row, takes its amax and writes e4m3 + scale, with the
MLP's GELU and the out-blocks' skip concatenation folded into that same pass.

Only the transformer blocks' linears (qkv, proj, fc1, fc2, skip_linear: >99% of the FLOPs)
become fp8, less those FP16_LAYERS names. The embeddings (K = 64 / 512, a few tokens), the output heads (decoder_pred,
text_out, clip_img_out: their error lands directly in the prediction) and the patch conv stay
in fp16; so do attention, the LayerNorms and the residual stream.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .fused_norm import available, triton

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _quantize_rows_kernel(X, S2, Q, SCALE, stride_x, stride_s, stride_q, n1, n2,
                              HAS_SKIP: tl.constexpr, GELU: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c1 = tl.arange(0, B1)
        m1 = c1 < n1
        x = tl.load(X + row * stride_x + c1, mask=m1, other=0.0).to(tl.float32)
        if GELU:
            x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        amax = tl.max(tl.abs(x), axis=0)
        if HAS_SKIP:
            c2 = tl.arange(0, B2)
            m2 = c2 < n2
            s = tl.load(S2 + row * stride_s + c2, mask=m2, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(s), axis=0))
        scale = tl.maximum(amax, 1e-12) / 448.0
        tl.store(Q + row * stride_q + c1, tl.clamp(x / scale, -448.0, 448.0).to(Q.dtype.element_ty), mask=m1)
        if HAS_SKIP:
            tl.store(Q + row * stride_q + n1 + c2, tl.clamp(s / scale, -448.0, 448.0).to(Q.dtype.element_ty), mask=m2)
        tl.store(SCALE + row, scale)


def quantize_rows(x: torch.Tensor, skip: torch.Tensor | None = None, gelu: bool = False):
    """e4m3 rows of [gelu(x) | skip] (2-D [M, K]) with one fp32 scale per row ([M, 1]):
    row ~= q * scale. GELU is the exact (erf) form."""
    if not available(x.device):
        v = F.gelu(x.float()) if gelu else x.float()
        if skip is not None:
            v = torch.cat([v, skip.float()], dim=-1)
        scale = v.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        return (v / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale
    n1, n2 = x.shape[-1], 0 if skip is None else skip.shape[-1]
    x = x.reshape(-1, n1)
    s = x if skip is None else skip.reshape(-1, n2)
    if x.stride(-1) != 1 or s.stride(-1) != 1:
        x, s = x.contiguous(), s.contiguous()
    q = torch.empty(x.shape[0], n1 + n2, dtype=E4M3, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    b1, b2 = triton.next_power_of_2(n1), triton.next_power_of_2(max(n2, 1))
    _quantize_rows_kernel[(x.shape[0],)](x, s, q, scale, x.stride(0), s.stride(0), q.stride(0), n1, n2,
                                         HAS_SKIP=skip is not None, GELU=gelu, B1=b1, B2=b2,
                                         num_warps=min(16, max(1, (b1 + b2) // 512)))
    return q, scale


_bias_in_epilogue: bool | None = None   # whether this torch/cuBLAS takes a bias with rowwise fp8


def scaled_mm(a, a_scale, w, w_scale, bias, out_dtype):
    """(a * a_scale) @ (w * w_scale^T)^T + bias: a [M, K] e4m3 with a_scale [M, 1], w [N, K]
    e4m3 with w_scale [1, N]."""
    global _bias_in_epilogue
    if a.device.type != "cuda":   # reference semantics for CPU tests
        out = (a.float() * a_scale) @ (w.float() * w_scale.t()).t()
        return (out if bias is None else out + bias.float()).to(out_dtype)
    if _bias_in_epilogue is None:
        try:
            torch._scaled_mm(a[:16], w.t(), scale_a=a_scale[:16], scale_b=w_scale, bias=bias, out_dtype=out_dtype)
            _bias_in_epilogue = True
        except (RuntimeError, ValueError):
            _bias_in_epilogue = False
    out = torch._scaled_mm(a, w.t(), scale_a=a_scale, scale_b=w_scale, bias=bias if _bias_in_epilogue else None,
                           out_dtype=out_dtype, use_fast_accum=True)
    return out if _bias_in_epilogue or bias is None else out.add_(bias)


class Fp8Linear(nn.Module):
    """An nn.Linear in e4m3 (per-output-channel weight scales, per-token activation scales).
    forward(x, skip=None) computes linear(cat([gelu?(x), skip], -1)) without the concatenation."""

    def __init__(self, linear: nn.Linear, input_gelu: bool = False):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
        self.register_buffer("weight", (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3))
        self.register_buffer("weight_scale", scale[None].contiguous())                  # [1, N] fp32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.out_dtype = linear.weight.dtype
        self.input_gelu = input_gelu
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.record_amax: float | None = None    # max activation |x| seen, while calibrating

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        a, a_scale = quantize_rows(x, skip, self.input_gelu)
        if self.record_amax is not None:   # host sync: calibration only, never in a graph
            self.record_amax = max(self.record_amax, a_scale.max().item() * E4M3_MAX)
        return scaled_mm(a, a_scale, self.weight, self.weight_scale, self.bias, self.out_dtype).view(*lead, -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_gelu={self.input_gelu}"


class Fp8Mlp(nn.Module):
    """fc2(gelu(fc1(x))) with GELU applied while quantising fc2's input (no pass of its own)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.fc1 = Fp8Linear(mlp.fc1)
        self.fc2 = Fp8Linear(mlp.fc2, input_gelu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


# Linears left in fp16 by default (names as in the UViT's state dict, or a prefix of them: a block).
# docs/fp8_sensitivity.py quantises one block at a time: the error a block's fp8 rounding adds to
# the final image falls steeply away from the ends of the U (the first in-blocks see the raw
# embeddings, the last out-blocks write straight into the prediction), so the two blocks at each
# end stay in fp16, at a small cost in speed (its run of record in docs/ has the figures).
FP16_LAYERS: tuple[str, ...] = ("in_blocks.0", "in_blocks.1", "out_blocks.13", "out_blocks.14")


def _kept(name: str, keep) -> bool:
    return any(name == k or name.startswith(k + ".") for k in keep)


def convert_uvit(uvit: nn.Module, keep=None) -> dict[str, dict]:
    """Replace the transformer blocks' linears of a loaded UViT by fp8 ones, in place, except
    those named (or under a name) in `keep` (default FP16_LAYERS). Returns per-layer
    weight-scale statistics {name: {min, median, max}}."""
    from .uvit import Block, Mlp
    keep = FP16_LAYERS if keep is None else tuple(keep)
    blocks = {n: m for n, m in uvit.named_modules() if isinstance(m, Block)}
    for name, blk in blocks.items():
        for attr in ("qkv", "proj"):
            if not _kept(f"{name}.attn.{attr}", keep):
                setattr(blk.attn, attr, Fp8Linear(getattr(blk.attn, attr)))
        if isinstance(blk.mlp, Mlp):
            fc1, fc2 = (not _kept(f"{name}.mlp.{f}", keep) for f in ("fc1", "fc2"))
            if fc1 and fc2:
                blk.mlp = Fp8Mlp(blk.mlp)
            elif fc1:      # Mlp then applies GELU on its own (its epilogue GELU needs an nn.Linear)
                blk.mlp.fc1 = Fp8Linear(blk.mlp.fc1)
            elif fc2:
                blk.mlp.fc2 = Fp8Linear(blk.mlp.fc2)
        if blk.skip_linear is not None and not _kept(f"{name}.skip_linear", keep):
            blk.skip_linear = Fp8Linear(blk.skip_linear)
    stats = {}
    for name, m in uvit.named_modules():
        if isinstance(m, Fp8Linear):
            s = m.weight_scale.flatten().tolist()
            stats[name] = {"w_scale_min": min(s), "w_scale_median": statistics.median(s), "w_scale_max": max(s)}
    return stats


@torch.no_grad()
def activation_amax(uvit: nn.Module, run) -> dict[str, float]:
    """Max |activation| entering each fp8 layer during run() (eager, a calibration pass)."""
    layers = {n: m for n, m in uvit.named_modules() if isinstance(m, Fp8Linear)}
    for m in layers.values():
        m.record_amax = 0.0
    try:
        run()
    finally:
        amax = {n: m.record_amax for n, m in layers.items()}
        for m in layers.values():
            m.record_amax = None
    return amax

"""Attention of one new token per beam over a KV cache that beams share by reference.

Beam search moves beams between rows every token: a beam continues another row's history. The
caption decoder's cache therefore never moves; each row keeps, per generated slot, the row
whose cache holds that slot of its history (`ptr`, [N, S] row indices, a few hundred integers
gathered per token instead of the whole cache). Slot s < P (the prefix) is the row's own; every
slot is written once, by the row that computed it, at the step it was fed, so what a pointer
names never changes afterwards.

`attend` writes the new token's key and value into its own row at `pos` and attends to slots
0..pos through the pointers. The Triton kernel does all of it in one launch per layer (one
program per row and head: the key and value writes, the gathered keys, softmax in fp32 and the
output in the layout of the projection that follows), where torch needs two cache writes, a
gather, a mask and the attention kernel. Off CUDA, without Triton, or unless asked (`fused`, the
fast path), it runs as those torch operations: the fp32 reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_norm import available, triton

BLOCK_T, NUM_WARPS = 256, 4     # cache slots per loop iteration, warps per (row, head) program

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _decode_attention_kernel(QKV, KC, VC, PTR, POS, O, stride_qkv, stride_cn, stride_ch, stride_ct,
                                 stride_ptr, stride_o, P, D, scale, T: tl.constexpr, HD: tl.constexpr,
                                 BLOCK_T: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, HD)
        pos = tl.load(POS)
        head = QKV + n * stride_qkv + h * HD + d
        q = tl.load(head).to(tl.float32) * scale
        k_new = tl.load(head + D)
        v_new = tl.load(head + 2 * D)
        own = n * stride_cn + h * stride_ch + pos * stride_ct + d
        tl.store(KC + own, k_new)
        tl.store(VC + own, v_new)
        # The new token's own term from registers (the stores above need not be visible to this
        # program's other threads yet), then slots 0..pos-1 from memory, online softmax. The loop
        # runs over the whole cache (a few blocks), masked: its bound stays static under a graph.
        m = tl.sum(q * k_new.to(tl.float32), 0)
        den = m * 0.0 + 1.0
        acc = v_new.to(tl.float32)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            valid = t < pos
            gen = t >= P
            row = tl.load(PTR + n * stride_ptr + (t - P), mask=valid & gen, other=0)
            row = tl.where(gen, row, n)
            off = row[:, None] * stride_cn + h * stride_ch + t[:, None] * stride_ct + d[None, :]
            k = tl.load(KC + off, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(VC + off, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            den = den * alpha + tl.sum(p, 0)
            m = m_new
        tl.store(O + n * stride_o + h * HD + d, (acc / den).to(O.dtype.element_ty))


def attend(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ptr: torch.Tensor,
           pos: torch.Tensor, prefix: int, n_head: int, fused: bool = False) -> torch.Tensor:
    """qkv [N, 3*D]: each row's new token's query, key and value (GPT-2's c_attn output); caches
    [N, H, T, hd], written at slot `pos` ([1] long, on the device); ptr [N, T - prefix] long,
    the row holding each generated slot (column pos - prefix: the row itself). Returns the
    attention output [N, D], heads concatenated."""
    N, D = qkv.shape[0], qkv.shape[1] // 3
    hd = D // n_head
    if fused and available(qkv.device) and qkv.stride(-1) == 1:
        out = torch.empty(N, D, dtype=qkv.dtype, device=qkv.device)
        _decode_attention_kernel[(N, n_head)](
            qkv, k_cache, v_cache, ptr, pos, out, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), ptr.stride(0), out.stride(0), prefix, D, hd ** -0.5, T=k_cache.shape[2], HD=hd,
            BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
        return out
    q, k, v = qkv.view(N, 3, n_head, 1, hd).unbind(1)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    T = k_cache.shape[2]
    slots = torch.arange(T, device=qkv.device)
    own = torch.arange(N, device=qkv.device)[:, None]
    rows = torch.cat([own.expand(N, prefix), ptr], 1)                           # [N, T]
    heads = torch.arange(n_head, device=qkv.device)[None, :, None]
    keys = k_cache[rows[:, None, :], heads, slots]                              # [N, H, T, hd]
    values = v_cache[rows[:, None, :], heads, slots]
    mask = (slots <= pos).view(1, 1, 1, T)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).reshape(N, D)

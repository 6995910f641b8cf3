"""One step of beam search's choice: from each beam's next-token logits, the K best continuations
of each search by length-normalised score, as the original's `generate_beam` ranks them.

The original takes softmax().log() of every beam's logits, adds the beam's summed score, divides
by the new lengths and runs topk over all K * vocab values of a search. Here that is the torch
path (the reference). The fast path's two Triton kernels give the same ranking without writing
the K * vocab scores: the first reduces each slice of a row to its max and sum of exponentials,
the second turns its slice into scores with the row's log-sum-exp and keeps the slice's K best;
topk then runs over those few candidates only. log(softmax(x)) is computed as x - logsumexp(x)
there (equal up to rounding), so only near-ties can rank differently from the reference.
"""
from __future__ import annotations

import torch

from .fused_norm import available, triton

SLICE = 4096          # vocabulary entries per program

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _slice_stats_kernel(X, M, S, V, n_slices, BLOCK: tl.constexpr):
        n, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        i = c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + n * V + i, mask=i < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        tl.store(M + n * n_slices + c, m)
        tl.store(S + n * n_slices + c, tl.sum(tl.exp(x - m), 0))

    @triton.jit
    def _slice_best_kernel(X, M, S, SCORES, LENGTHS, STOPPED, VALS, IDX, V, n_slices,
                           K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        n, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        m = tl.load(M + n * n_slices + cs, mask=cs < n_slices, other=float("-inf"))
        s = tl.load(S + n * n_slices + cs, mask=cs < n_slices, other=0.0)
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
        i = c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + n * V + i, mask=i < V, other=float("-inf")).to(tl.float32)
        stopped = tl.load(STOPPED + n) != 0
        # A finished beam's only continuation: token 0 at log-probability 0 (its score kept).
        logp = tl.where(stopped, tl.where(i == 0, 0.0, float("-inf")), x - lse)
        avg = (tl.load(SCORES + n) + logp) / tl.load(LENGTHS + n)
        avg = tl.where(i < V, avg, float("-inf"))
        out = (n * n_slices + c) * K
        for k in tl.static_range(K):
            best = tl.max(avg, 0)
            at = tl.argmax(avg, 0)
            tl.store(VALS + out + k, best)
            tl.store(IDX + out + k, c * BLOCK + at)
            avg = tl.where(tl.arange(0, BLOCK) == at, float("-inf"), avg)


def best_continuations(logits: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, stopped: torch.Tensor,
                       frozen: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, K, V] (any float dtype); scores, lengths (each beam's length after this token)
    [B, K] fp32; stopped [B, K] bool; frozen [V], a finished beam's log-probabilities. Returns
    (avg, src, tok) [B, K]: the K best average scores of each search, the beam each continues and
    its next token, best first."""
    B, K, V = logits.shape
    if not (fused and available(logits.device)):
        logp = logits.float().softmax(-1).log()
        logp = torch.where(stopped[..., None], frozen, logp)
        avg, idx = ((scores[..., None] + logp) / lengths[..., None]).view(B, K * V).topk(K, dim=-1)
        return avg, idx // V, idx % V
    x = logits.reshape(B * K, V)
    if x.stride(-1) != 1 or x.stride(0) != V:
        x = x.contiguous()
    n_slices = triton.cdiv(V, SLICE)
    dev = logits.device
    m = torch.empty(B * K, n_slices, device=dev)
    s = torch.empty_like(m)
    vals = torch.empty(B * K, n_slices, K, device=dev)
    idx = torch.empty(B * K, n_slices, K, device=dev, dtype=torch.long)
    grid = (B * K, n_slices)
    _slice_stats_kernel[grid](x, m, s, V, n_slices, BLOCK=SLICE, num_warps=4)
    _slice_best_kernel[grid](x, m, s, scores.contiguous(), lengths.contiguous(), stopped.contiguous(), vals, idx,
                             V, n_slices, K=K, BLOCK=SLICE, BLOCK_C=triton.next_power_of_2(n_slices), num_warps=4)
    avg, j = vals.view(B, K * n_slices * K).topk(K, dim=-1)
    return avg, j // (n_slices * K), idx.view(B, -1).gather(1, j)

"""Where one UViT call's GPU time goes (--profile), and the fp8 path's scales."""
from __future__ import annotations

import torch

KINDS = ("gemm", "attention", "layernorm", "fp8 quantize", "elementwise/other")


def fp8_scale_report(backend, run_uvit) -> dict:
    """Per fp8 layer: weight-scale min/median/max and the max activation |x| seen on one
    calibration call (eager: the recording syncs with the host)."""
    from models import fp8
    amax = fp8.activation_amax(backend.uvit_net, run_uvit)
    return {name: dict(s, act_amax=amax[name]) for name, s in backend.fp8_weight_stats.items()}


def kernel_kind(name: str) -> str:
    """One of KINDS for a CUDA kernel's (lower-cased) name."""
    if any(s in name for s in ("gemm", "cutlass", "xmma", "sm90", "ampere_", "cublas")) and "flash" not in name:
        return "gemm"
    if any(s in name for s in ("flash", "fmha", "attention", "mem_eff", "sdpa")):
        return "attention"
    if "norm" in name:
        return "layernorm"
    if "quantize" in name:
        return "fp8 quantize"
    return "elementwise/other"


def profile_uvit(backend, u, h, w, device, dtype) -> dict:
    """Kernel time of one eager CFG-batched UViT call (batch 1), by kind."""
    from torch.profiler import ProfilerActivity, profile
    rows = 2
    a = (torch.randn(rows, u.in_chans, h, w, device=device, dtype=dtype), torch.randn(rows, 1, u.clip_img_dim, device=device, dtype=dtype),
         torch.randn(rows, u.num_text_tokens, u.text_dim, device=device, dtype=dtype), torch.full((rows,), 500.0, device=device),
         torch.tensor([0.0, 1000.0], device=device), torch.ones(rows, dtype=torch.long, device=device))
    with torch.no_grad():
        for _ in range(3):
            backend.uvit(*a)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            backend.uvit(*a)
            torch.cuda.synchronize()
    kinds = dict.fromkeys(KINDS, 0.0)
    kernels = []
    for e in prof.key_averages():
        if e.device_type.name != "CUDA":
            continue
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        kernels.append((us, e.count, e.key[:90]))
        kinds[kernel_kind(e.key.lower())] += us
    total = sum(kinds.values())
    top = [{"ms": us / 1e3, "calls": n, "kernel": k} for us, n, k in sorted(kernels, reverse=True)[:10]]
    return {k: {"ms": v / 1e3, "share": v / total} for k, v in kinds.items() if v} | {"total_ms": total / 1e3, "top_kernels": top}

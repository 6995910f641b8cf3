"""Medians of CUDA-event timings (a synchronised clock on the CPU), CUDA-graph replay, peak memory."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..backends.graphs import capture_graph


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup=3, repeats=20) -> float:
    """Median milliseconds of fn(): CUDA events on a GPU, a synchronised clock on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class Clock:
    """time_ms on the run's device. On the CPU (a smoke test of the code paths, whose times mean
    nothing) each measurement is cut to one warm-up and at most `cpu_repeats` timed calls."""
    device: torch.device
    cpu_repeats: int

    def ms(self, fn, warmup=3, repeats=20) -> float:
        if self.device.type != "cuda":
            warmup, repeats = min(warmup, 1), min(repeats, self.cpu_repeats)
        return time_ms(fn, self.device, warmup, repeats)


def graphed(fn, device):
    """fn captured in a CUDA graph (the fast path's way of running a fixed-shape call)."""
    if device.type != "cuda":
        return fn
    return capture_graph(fn)[0].replay


def peak_mb(device, fn) -> float:
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20

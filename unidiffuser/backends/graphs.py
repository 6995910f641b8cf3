"""CUDA graph capture, shared by the backends, the pipeline's sampling loop and the benchmark."""
from __future__ import annotations

from typing import Callable

import torch


def capture_graph(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run fn once on a side stream, so that handles, autotuning and compilation happen outside
    the capture, then capture fn. Replaying the graph recomputes the returned tensor from fn's
    current inputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out

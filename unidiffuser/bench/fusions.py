"""The fast path with its fusions off, to measure what they bring, switched only through the
backend's own switches (set_uvit_fusions, set_decoder_fusions): what "off" means is theirs."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from ..backends.torch_backend import set_decoder_fusions, set_uvit_fusions


@contextmanager
def uvit_fusions_off(uvit: torch.nn.Module):
    """The fast path's UViT with every fusion off inside the block, all on again after it (as the
    backend built it). Flags only: nothing is reallocated, so graphs captured before stay valid."""
    set_uvit_fusions(uvit, False)
    try:
        yield uvit
    finally:
        set_uvit_fusions(uvit, True)


def decoder_without_fusions(vae_decoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of the fast path's decoder with its fusions off (NCHW, torch's GroupNorm + SiLU).
    A copy, not the decoder itself: switching its layout rewrites its conv weights into new
    memory, under the CUDA graphs already captured from it, whose replays would read freed memory."""
    off = copy.deepcopy(vae_decoder)
    set_decoder_fusions(off, False)
    return off

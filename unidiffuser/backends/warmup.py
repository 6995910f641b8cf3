"""First-use costs of the fast kernels, paid while the weights load instead of before the first image."""
from __future__ import annotations

import logging
import threading

import torch
from torch.nn.attention import sdpa_kernel

from models.config import ModelConfig

log = logging.getLogger("unidiffuser")


def warm_up_in_background(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> threading.Thread:
    """A thread that runs one UViT out-block (at the default size's sequence length), the patch
    convolution, a decoder-sized convolution and the fused GroupNorm on throwaway weights, so that
    what a process pays on the first use of each (loading the cuDNN and cuBLAS libraries and
    kernels, Triton's cached kernel and its launcher, the plugin library: about a second on an
    H200) overlaps the loading of the weights instead of delaying the first image. (cuDNN keeps
    its attention plans per thread: the pipeline's thread still builds its own.) Nothing it makes
    is kept; a failure only loses the head start (logged at debug level). Like every UViT call, it
    sets SDPA's process-wide backend priority while it runs."""
    # A new thread starts on GPU 0 whatever the caller chose (torchrun ranks set theirs), and
    # Triton launches on the current device: give the thread the caller's.
    index = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()

    def work():
        try:
            if index is not None:
                torch.cuda.set_device(index)
            from models import groupnorm
            from models.uvit import Block, PatchEmbed

            from .torch_backend import FAST_SDPA, set_uvit_fusions

            u, v = cfg.uvit, cfg.vae_decoder
            side = cfg.default_size // v.downsample
            with torch.no_grad(), torch.device(device):
                block = Block(u, skip=True).to(dtype)
                set_uvit_fusions(block)
                x = torch.randn(2, u.sequence_length(side, side), u.embed_dim, dtype=dtype)
                with sdpa_kernel(FAST_SDPA, set_priority=True):
                    block(x, x)
                PatchEmbed(u).to(dtype)(torch.randn(2, u.in_chans, side, side, dtype=dtype))
                c = v.ch * v.ch_mult[-1]
                h = torch.randn(1, c, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
                conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
                conv(h)
                if device.type == "cuda" and groupnorm.available():
                    groupnorm.group_norm(h, torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype), v.num_groups,
                                         1e-6, True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        except Exception as e:   # noqa: BLE001 - a head start, never a reason to fail
            log.debug("warm-up thread: %s: %s", type(e).__name__, e)

    thread = threading.Thread(target=work, name="warm-up", daemon=True)
    thread.start()
    return thread



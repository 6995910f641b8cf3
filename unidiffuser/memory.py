"""Will a request fit? A conservative estimate of the memory one generation needs, checked
against the device before any weights are read, so that `--height 100000` is a clear error and
not minutes of loading followed by an out-of-memory traceback.

The estimate (bytes, at the networks' dtype) is the sum of:
  weights      the three networks (from the manifest's file sizes, at the run's dtype); on the
               CPU the stored state dicts are in memory too while they load
  uvit         one CFG-batched UViT call on 2B rows of L = 81 + (h/2)(w/2) tokens, width D:
               the depth/2 long-skip outputs held across the call, plus the working block
               (x, norm, q/k/v, attention output, the MLP's hidden, the skip concat);
               attention itself goes through SDPA's fused kernels (head size 64), no L x L matrix
  decoder      the VAE decoder at its largest activation (channels x pixels; 256 x H x W for v1)
               times 4 live tensors, plus the mid-block attention over the h x w latent, counted
               as a full (hw)^2 matrix (its one head of 512 channels is outside the fused kernels)
  solver       the DPM-Solver++ state and the unconditional branch's text noise, fp32
On CUDA at fp16/bf16 the UViT call and the decoder are each captured as a CUDA graph whose
memory stays reserved, so their activations add up; otherwise the larger of the two counts.
Checked against v1 (models/config.py) in fp16 with CUDA graphs: 512x512 batch 1 is estimated at
2.8 GiB, batch 8 at 7.9 GiB (2.0 of weights, 5.9 of activations; the H200 benchmark measured
a peak of 4.8 GiB at batch 8, about 2.7 GiB above the weights, so the estimate is ~2x on the
safe side there); the largest
square at batch 1 is 1920 on 24 GiB free and 2816 on 80 GiB.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

from models.config import ModelConfig

from .limits import MAX_SIDE

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 2}   # fp8 loads fp16 first, the rest stays fp16


@dataclass
class Estimate:
    weights: int
    uvit: int
    decoder: int
    solver: int
    graphs: bool

    @property
    def total(self) -> int:
        act = self.uvit + self.decoder if self.graphs else max(self.uvit, self.decoder)
        return self.weights + act + self.solver


def estimate(cfg: ModelConfig, batch: int, height: int, width: int, dtype: str, weight_bytes: int,
             steps: int = 50, graphs: bool = False) -> Estimate:
    b = DTYPE_BYTES[dtype]
    u, v = cfg.uvit, cfg.vae_decoder
    f = v.downsample
    h, w = height // f, width // f
    rows = 2 * batch
    tokens = u.sequence_length(h, w)
    units = u.depth // 2 + 6 + u.mlp_ratio          # skips + working tensors, in units of [rows, L, D]
    uvit = units * rows * tokens * u.embed_dim * b

    # Largest channels x pixels in the decoder: the upsampled output of each level, and each
    # level's own width at its resolution.
    n = len(v.ch_mult)
    largest, block_in = 0, v.ch * v.ch_mult[-1]
    for i in reversed(range(n)):
        px = (h << (n - 1 - i)) * (w << (n - 1 - i))
        largest = max(largest, block_in * px, v.ch * v.ch_mult[i] * px)
        block_in = v.ch * v.ch_mult[i]
        if i != 0:
            largest = max(largest, block_in * px * 4)
    decoder = batch * (4 * largest + 2 * (h * w) ** 2 + 2 * 3 * height * width * 2) * b

    state = u.in_chans * h * w + u.clip_img_dim
    solver = 4 * batch * (8 * state + steps * u.num_text_tokens * u.text_dim)
    return Estimate(weight_bytes, uvit, decoder, solver, graphs)


def available(device: str) -> tuple[int, str]:
    """Bytes free on the device, and its name for messages."""
    if device.startswith("cuda"):
        import torch
        index = torch.device(device).index or 0
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"{torch.cuda.get_device_name(index)} ({device})"
    return cpu_available(), "this machine's RAM"


def cpu_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def largest(hi: int, ok) -> int:
    """The largest n in 0..hi with ok(n), for ok true up to some n and false above (0 if none)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest_square(fits, step: int = 16) -> int:
    """The largest square side (a multiple of `step`, at most MAX_SIDE) for which fits(side)."""
    return step * largest(MAX_SIDE // step, lambda n: fits(n * step))


def what_fits(cfg: ModelConfig, batch: int, height: int, width: int, dtype: str, weight_bytes: int,
              steps: int, graphs: bool, free: int) -> str:
    """The largest square at this batch, and the largest batch at this size, that fit in `free`."""
    def fits(n, h, w):
        return estimate(cfg, n, h, w, dtype, weight_bytes, steps, graphs).total <= free

    side = largest_square(lambda s: fits(batch, s, s))
    n_fit = largest(batch - 1, lambda n: fits(n, height, width))   # the largest batch that fits at the asked size
    what = [f"at most {side}x{side} at this batch of {batch}" if side else f"no size at a batch of {batch}"]
    if n_fit:
        what.append(f"a batch of at most {n_fit} at {height}x{width}")
    return " or ".join(what)


def check_fits(cfg: ModelConfig, batch: int, height: int, width: int, dtype: str, weight_bytes: int,
               steps: int, device: str, graphs: bool, free: int | None = None, where: str | None = None) -> Estimate:
    """Raise ValueError, saying what would fit, when the request needs more than the device has."""
    if free is None:
        free, where = available(device)
    e = estimate(cfg, batch, height, width, dtype, weight_bytes, steps, graphs)
    if e.total <= free:
        return e
    raise ValueError(
        f"--height {height} --width {width} with {batch} image(s) per batch needs about {e.total / GiB:.1f} GiB "
        f"(weights {e.weights / GiB:.1f}, UViT {e.uvit / GiB:.1f}, decoder {e.decoder / GiB:.1f}); "
        f"{where} has {free / GiB:.1f} GiB free. What would fit: "
        + what_fits(cfg, batch, height, width, dtype, weight_bytes, steps, graphs, free))


@dataclass
class Budget:
    """What one run's requests are checked against: the model, the run's dtype and device, and
    the memory free when it was checked (check)."""
    cfg: ModelConfig
    dtype: str
    weight_bytes: int
    steps: int
    device: str
    graphs: bool
    free: int | None = None
    where: str | None = None

    def check(self, batch: int, height: int, width: int) -> Estimate:
        if self.free is None:
            self.free, self.where = available(self.device)
        return check_fits(self.cfg, batch, height, width, self.dtype, self.weight_bytes, self.steps, self.device,
                          self.graphs, self.free, self.where)

    def after_failure(self, batch: int, height: int, width: int) -> str:
        """What to say when a request the estimate let through still ran out of memory: the estimate
        was too low here, so what fits in half of what was free is suggested."""
        e = estimate(self.cfg, batch, height, width, self.dtype, self.weight_bytes, self.steps, self.graphs)
        free = self.free or 0
        fits = what_fits(self.cfg, batch, height, width, self.dtype, self.weight_bytes, self.steps, self.graphs,
                         free // 2 + e.weights // 2)
        return (f"estimated {e.total / GiB:.1f} GiB of the {free / GiB:.1f} GiB free on {self.where}, too little here; "
                f"what would fit with room to spare: {fits}")


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: torch.OutOfMemoryError (CUDA), the CPU allocator's RuntimeError
    ("DefaultCPUAllocator: can't allocate memory"), or Python's MemoryError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text
                                            or "Cannot allocate memory" in text)


@contextmanager
def explained(what: str, budget: Budget | None = None, batch: int = 0, height: int = 0, width: int = 0):
    """An allocation failing inside the block carries what was being done (and, with a budget, what
    would fit) for cli.run's one line (`unidiffuser_context`)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if out_of_memory(e) and not hasattr(e, "unidiffuser_context"):
            hint = f"; {budget.after_failure(batch, height, width)}" if budget is not None and budget.free else ""
            try:
                e.unidiffuser_context = f"out of memory while {what}{hint}"
            except AttributeError:
                pass
        raise

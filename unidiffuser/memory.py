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
  solver       the DPM-Solver++ state and the unconditional branch's text noise, fp32 (drawn
               up front for every step: steps x 77 x text_dim per image; on the CPU counted
               twice, as pipeline.initial_noise holds the per-image draws and their stack at once)
  heap         on the CPU only: what the process's resident size grows by beyond the live
               tensors. glibc keeps freed blocks (its mmap threshold rises to the largest block
               freed), so the peak RSS of a request was measured at up to ~2.9x its live tensors
               on tiny (tests/test_memory.py); counted as (CPU_HEAP - 1) x the activations and
               the solver, plus CPU_SLACK for the allocator's and threads' own pages
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
CPU_HEAP = 3            # peak RSS / live tensor bytes of a request on the CPU (measured up to ~2.9)
CPU_SLACK = 32 << 20
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 2}   # fp8 loads fp16 first, the rest stays fp16


@dataclass
class Estimate:
    weights: int
    uvit: int
    decoder: int
    solver: int
    graphs: bool
    heap: int = 0

    @property
    def total(self) -> int:
        act = self.uvit + self.decoder if self.graphs else max(self.uvit, self.decoder)
        return self.weights + act + self.solver + self.heap


def estimate(cfg: ModelConfig, batch: int, height: int, width: int, dtype: str, weight_bytes: int,
             steps: int = 50, graphs: bool = False, cpu: bool = False) -> Estimate:
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
    noise = steps * u.num_text_tokens * u.text_dim
    solver = 4 * batch * (8 * state + (2 if cpu else 1) * noise)
    heap = (CPU_HEAP - 1) * (max(uvit, decoder) + solver) + CPU_SLACK if cpu else 0
    return Estimate(weight_bytes, uvit, decoder, solver, graphs, heap)


def available(device: str) -> tuple[int, str]:
    """Bytes free on the device, and its name for messages."""
    if device.startswith("cuda"):
        import torch
        index = torch.device(device).index or 0
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"{torch.cuda.get_device_name(index)} ({device})"
    return cpu_available(), "this machine's RAM"


def cpu_available(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """RAM available to this process: the machine's MemAvailable, or less when the process's
    memory cgroup (a container's --memory) leaves less."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limited = cgroup_available(cgroup_root)
    return free if limited is None else min(free, limited)


def cgroup_available(root: str = "/sys/fs/cgroup") -> int | None:
    """Limit less usage of this process's memory cgroup (v2 memory.max, v1 memory.limit_in_bytes),
    with the reclaimable page cache (inactive_file) counted as available; None without a limit."""
    def number(path):
        try:
            text = open(path).read().strip()
            return None if text == "max" else int(text)
        except (OSError, ValueError):
            return None

    def inactive_file(folder):
        try:
            for line in open(os.path.join(folder, "memory.stat")):
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file"):
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    paths = {"": "/", "memory": "/"}
    try:
        for line in open("/proc/self/cgroup"):
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in (controllers.split(",") if controllers else [""]):
                if c in paths:
                    paths[c] = path
    except (OSError, ValueError):
        pass
    found = []
    for sub, limit_file, usage_file in (("", "memory.max", "memory.current"),
                                        ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes")):
        base = os.path.join(root, sub) if sub else root
        for folder in dict.fromkeys((os.path.join(base, paths[sub].lstrip("/")), base)):
            limit, usage = number(os.path.join(folder, limit_file)), number(os.path.join(folder, usage_file))
            if limit is not None and usage is not None and limit < 1 << 60:
                found.append(max(0, limit - usage + inactive_file(folder)))
    return min(found) if found else None


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
              steps: int, graphs: bool, free: int, cpu: bool = False) -> str:
    """The largest square at this batch, and the largest batch at this size, that fit in `free`."""
    def fits(n, h, w):
        return estimate(cfg, n, h, w, dtype, weight_bytes, steps, graphs, cpu).total <= free

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
    cpu = not device.startswith("cuda")
    e = estimate(cfg, batch, height, width, dtype, weight_bytes, steps, graphs, cpu)
    if e.total <= free:
        return e
    raise ValueError(
        f"--height {height} --width {width} with {batch} image(s) per batch needs about {e.total / GiB:.1f} GiB "
        f"(weights {e.weights / GiB:.1f}, UViT {e.uvit / GiB:.1f}, decoder {e.decoder / GiB:.1f}"
        + (f", allocator {e.heap / GiB:.1f}" if e.heap else "") + f"); "
        f"{where} has {free / GiB:.1f} GiB free. What would fit: "
        + what_fits(cfg, batch, height, width, dtype, weight_bytes, steps, graphs, free, cpu))


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
        cpu = not self.device.startswith("cuda")
        e = estimate(self.cfg, batch, height, width, self.dtype, self.weight_bytes, self.steps, self.graphs, cpu)
        free = self.free or 0
        fits = what_fits(self.cfg, batch, height, width, self.dtype, self.weight_bytes, self.steps, self.graphs,
                         free // 2 + e.weights // 2, cpu)
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

"""What a request may ask for, checked without torch: the commands check their arguments with
these before importing anything heavy, and pipeline.Request.validate checks every request (the
Python API's too) with the same rules and messages."""
from __future__ import annotations

import math

# The largest image side accepted: 8x the side v1 was trained at (512). Beyond it the UViT's
# interpolated positional embedding has nothing left to say, and the decoder alone needs tens of GiB.
MAX_SIDE = 4096
MAX_STEPS = 1000   # the discrete noise schedule has 1000 steps; the solver needs no more
MAX_BATCH = 4096   # images in one batch: far beyond what any GPU holds at 512x512 (memory.py says what fits)


def check_side(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 16 or value > MAX_SIDE:
        raise ValueError(f"--{name} must be a positive multiple of 16 (8x VAE, 2x2 patches) of at most "
                         f"{MAX_SIDE}, got {value}")


def check_steps(steps) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"--steps must be in 1..{MAX_STEPS}, got {steps}")


def check_scale(scale) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"--scale must be a finite number, got {scale}")

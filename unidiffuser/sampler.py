"""DPM-Solver++ as UniDiffuser's `sample_multi_v1.py` runs it.

The original calls `DPM_Solver(model_fn, NoiseScheduleVP('discrete', betas), predict_x0=True)
.sample(x, steps=50, eps=1/N, T=1)` with that function's defaults: method 'fast', order 3,
skip_type 'time_uniform', solver_type 'dpm_solver'. So:

- the time grid is `steps + 1` points uniform in t from T to eps (not uniform in logSNR);
- 'fast' assigns K = steps // 3 + 1 solver steps of order 3, with one order-2 and/or order-1
  step at the end, the orders summing to `steps`; a step of order k spans k grid intervals and
  evaluates the model at the grid points inside it (r1, r2 are those points' logSNR fractions);
- the model is asked for noise and converted to a data (x0) prediction.

Each solver step is a fixed linear recipe: stage i evaluates the model at
`a_i * x + sum_j c_ij * D_j` (D_j = earlier data predictions in this step), the step's result is
`a * x + sum_j c_j * D_j`. The recipe depends only on `steps`, so `plan()` computes it once, in
float64, and sampling is a static sequence of tensor operations (CUDA-graph friendly).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000


def betas(n: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Stable Diffusion's 'scaled linear' schedule used by UniDiffuser."""
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2


class NoiseSchedule:
    """Discrete VP schedule made continuous by piecewise-linear interpolation of log(alpha_t)
    over t_n = n / N, n = 1..N (DPM-Solver's NoiseScheduleVP('discrete'))."""

    def __init__(self, b: torch.Tensor | None = None):
        b = betas() if b is None else b
        self.N = len(b)
        # The original builds the schedule from float32 betas; do the same, then work in float64.
        self.log_alpha = (0.5 * torch.log(1 - b.float()).cumsum(0)).double()
        self.t = torch.linspace(1.0 / self.N, 1.0, self.N, dtype=torch.float64)

    @staticmethod
    def _interp(x: float, xp: torch.Tensor, fp: torch.Tensor) -> float:
        """Piecewise-linear through (xp, fp), xp increasing, extended linearly past both ends."""
        i = int(torch.searchsorted(xp, torch.tensor(x, dtype=xp.dtype)).clamp(1, len(xp) - 1))
        x0, x1, y0, y1 = xp[i - 1].item(), xp[i].item(), fp[i - 1].item(), fp[i].item()
        return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

    def log_alpha_at(self, t: float) -> float:
        return self._interp(t, self.t, self.log_alpha)

    def alpha(self, t: float) -> float:
        return math.exp(self.log_alpha_at(t))

    def sigma(self, t: float) -> float:
        return math.sqrt(1.0 - math.exp(2.0 * self.log_alpha_at(t)))

    def lam(self, t: float) -> float:
        """Half log-SNR: log(alpha_t / sigma_t)."""
        la = self.log_alpha_at(t)
        return la - 0.5 * math.log(1.0 - math.exp(2.0 * la))

    def inverse_lam(self, lam: float) -> float:
        log_alpha = -0.5 * math.log1p(math.exp(-2.0 * lam))
        # log_alpha decreases with t: interpolate over the reversed (increasing) table.
        return self._interp(log_alpha, self.log_alpha.flip(0), self.t.flip(0))


def fast_orders(steps: int) -> list[int]:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    K = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (K - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (K - 1) + [1]
    return [3] * (K - 1) + [2]


@dataclass(frozen=True)
class Stage:
    t: float                      # continuous time at which the model is evaluated
    a: float                      # coefficient of the step's starting x
    c: tuple[float, ...]          # coefficients of this step's earlier data predictions


@dataclass(frozen=True)
class Step:
    order: int
    stages: tuple[Stage, ...]
    a: float
    c: tuple[float, ...]


@dataclass(frozen=True)
class Plan:
    steps: int                    # model evaluations (NFE)
    timesteps: tuple[float, ...]  # the steps + 1 grid points, T .. eps
    solver_steps: tuple[Step, ...]
    schedule: NoiseSchedule

    @property
    def orders(self) -> list[int]:
        return [s.order for s in self.solver_steps]

    @property
    def eval_times(self) -> list[float]:
        return [st.t for s in self.solver_steps for st in s.stages]


@functools.lru_cache(maxsize=64)    # a few ms of host work per request otherwise; a Plan is immutable
def plan(steps: int, schedule: NoiseSchedule | None = None, eps: float | None = None, T: float = 1.0) -> Plan:
    ns = schedule or NoiseSchedule()
    eps = 1.0 / ns.N if eps is None else eps
    orders = fast_orders(steps)
    ts = torch.linspace(T, eps, steps + 1, dtype=torch.float32).tolist()  # float32 grid, as the original
    solver_steps, i = [], 0
    for k in orders:
        s, t = ts[i], ts[i + k]
        lam_s, lam_t = ns.lam(s), ns.lam(t)
        h = lam_t - lam_s
        sig_s, sig_t, alpha_t = ns.sigma(s), ns.sigma(t), ns.alpha(t)
        phi_1 = math.expm1(-h)
        first = Stage(s, 1.0, ())
        if k == 1:
            stages, c = (first,), (-alpha_t * phi_1,)
        else:
            r1 = (ns.lam(ts[i + 1]) - lam_s) / h
            s1 = ns.inverse_lam(lam_s + r1 * h)
            mid1 = Stage(s1, ns.sigma(s1) / sig_s, (-ns.alpha(s1) * math.expm1(-r1 * h),))
            if k == 2:
                stages = (first, mid1)
                c = (-alpha_t * phi_1 + 0.5 / r1 * alpha_t * phi_1, -0.5 / r1 * alpha_t * phi_1)
            else:
                r2 = (ns.lam(ts[i + 2]) - lam_s) / h
                s2 = ns.inverse_lam(lam_s + r2 * h)
                alpha_s2 = ns.alpha(s2)
                phi_12 = math.expm1(-r2 * h)
                phi_22 = phi_12 / (r2 * h) + 1.0
                phi_2 = phi_1 / h + 1.0
                w = r2 / r1 * alpha_s2 * phi_22        # weight of (D_s1 - D_s) in x_s2
                mid2 = Stage(s2, ns.sigma(s2) / sig_s, (-alpha_s2 * phi_12 - w, w))
                stages = (first, mid1, mid2)
                c = (-alpha_t * phi_1 - alpha_t * phi_2 / r2, 0.0, alpha_t * phi_2 / r2)
        solver_steps.append(Step(k, stages, sig_t / sig_s, c))
        i += k
    return Plan(steps, tuple(ts), tuple(solver_steps), ns)


NoiseFn = Callable[[torch.Tensor, int, float], torch.Tensor]


def sample(noise_fn: NoiseFn, x: torch.Tensor, p: Plan, callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate from x at time T to time eps.

    noise_fn(x, k, t) predicts the noise in x at continuous time t; k counts model evaluations
    (0 .. steps - 1) so the caller can use per-evaluation inputs drawn up front. Its result is
    used before the next call and never kept, so it may be a buffer the next call overwrites (the
    CUDA-graph path returns the graph's output buffer).
    """
    ns = p.schedule
    k = 0
    for step in p.solver_steps:
        D = []
        for st in step.stages:
            xi = x if not st.c else st.a * x + sum(c * d for c, d in zip(st.c, D))
            eps = noise_fn(xi, k, st.t)
            D.append((xi - ns.sigma(st.t) * eps) / ns.alpha(st.t))
            k += 1
            if callback is not None:
                callback(k)
        x = step.a * x + sum(c * d for c, d in zip(step.c, D) if c != 0.0)
    return x

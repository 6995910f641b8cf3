"""DPM-Solver++ 'fast' as sample_multi_v1.py runs it: schedule, grid, orders, known answers."""
import math

import pytest
import torch

from unidiffuser import sampler


def test_betas_are_scaled_linear():
    b = sampler.betas()
    assert b.dtype == torch.float64 and len(b) == 1000
    assert b[0].item() == pytest.approx(0.00085) and b[-1].item() == pytest.approx(0.012)
    assert torch.allclose(b.sqrt().diff(), torch.full((999,), (0.012 ** 0.5 - 0.00085 ** 0.5) / 999, dtype=torch.float64))


def test_schedule_matches_discrete_table_and_inverts():
    ns = sampler.NoiseSchedule()
    table = 0.5 * torch.log(1 - sampler.betas().float()).cumsum(0)
    for n in (1, 2, 500, 999, 1000):
        assert ns.log_alpha_at(n / 1000) == pytest.approx(table[n - 1].item(), abs=1e-7)
    assert ns.alpha(0.5) ** 2 + ns.sigma(0.5) ** 2 == pytest.approx(1.0)
    for t in (0.001, 0.0173, 0.3, 0.77, 1.0):
        assert ns.inverse_lam(ns.lam(t)) == pytest.approx(t, abs=1e-9)


@pytest.mark.parametrize("steps, orders", [
    (1, [1]), (2, [2]), (3, [2, 1]), (4, [3, 1]), (5, [3, 2]), (6, [3, 2, 1]),
    (50, [3] * 16 + [2]), (51, [3] * 16 + [2, 1]), (25, [3] * 8 + [1]),
])
def test_fast_orders(steps, orders):
    assert sampler.fast_orders(steps) == orders
    assert sum(orders) == steps


def test_plan_grid_is_time_uniform_and_stages_sit_on_it():
    p = sampler.plan(50)
    assert len(p.timesteps) == 51
    assert p.timesteps[0] == 1.0 and p.timesteps[-1] == pytest.approx(0.001)
    assert torch.allclose(torch.tensor(p.timesteps), torch.linspace(1.0, 0.001, 51))
    # Every model evaluation happens at a grid point, each once, in order: NFE == steps.
    assert len(p.eval_times) == 50
    assert p.eval_times == pytest.approx(p.timesteps[:-1], abs=1e-6)


def test_steps_below_one_rejected():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sampler.plan(0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 50])
def test_exact_for_a_constant_data_prediction(steps):
    """If the network's x0 prediction is a constant x0, the ODE solution is known in closed form,
    x_eps = alpha_eps x0 + sigma_eps / sigma_T (x_T - alpha_T x0), and DPM-Solver++ of every order
    reproduces it exactly (all higher-order differences vanish)."""
    p = sampler.plan(steps)
    ns = p.schedule
    g = torch.Generator().manual_seed(steps)
    x0 = torch.randn(3, 17, generator=g, dtype=torch.float64)
    xT = torch.randn(3, 17, generator=g, dtype=torch.float64)
    calls = []

    def noise(x, k, t):
        calls.append(k)
        return (x - ns.alpha(t) * x0) / ns.sigma(t)

    out = sampler.sample(noise, xT, p)
    T, eps = p.timesteps[0], p.timesteps[-1]
    expected = ns.alpha(eps) * x0 + ns.sigma(eps) / ns.sigma(T) * (xT - ns.alpha(T) * x0)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert calls == list(range(steps))


def test_converges_to_the_exact_ode_solution_for_gaussian_data():
    """Data ~ N(0, s^2): the exact noise prediction is sigma x / (alpha^2 s^2 + sigma^2) and the
    probability-flow ODE scales x by sqrt(alpha^2 s^2 + sigma^2) ratios. More steps, less error."""
    s2 = 0.25
    ns = sampler.NoiseSchedule()
    xT = torch.randn(4, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def noise(x, k, t):
        a, s = ns.alpha(t), ns.sigma(t)
        return s * x / (a * a * s2 + s * s)

    errs = []
    for steps in (6, 12, 24, 50):
        p = sampler.plan(steps, ns)
        T, eps = p.timesteps[0], p.timesteps[-1]
        exact = xT * math.sqrt(ns.alpha(eps) ** 2 * s2 + ns.sigma(eps) ** 2) / math.sqrt(ns.alpha(T) ** 2 * s2 + ns.sigma(T) ** 2)
        errs.append(((sampler.sample(noise, xT, p) - exact).norm() / exact.norm()).item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.02, errs

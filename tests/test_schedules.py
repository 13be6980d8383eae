"""Schedules (design §3): endpoints, monotonicity, and each formula against an independent numpy computation."""

import math

import numpy as np
import pytest
import torch

from solvers import get_schedule
from solvers.schedules import VP_EPS_S

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


class DiscreteTimeNet:
    """A stand-in for an LDM wrapper: sigma(t) from a DDPM alphas_cumprod (LDM's linear-in-sqrt betas), with
    log(alpha) piecewise linear in t over the keypoints t_k = k/1000, k = 1..1000, extrapolated linearly
    beyond them (sigma_min = 0.006 lies below sigma(0.001) = 0.039)."""

    def __init__(self):
        betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.t_keys = torch.arange(1, 1001, dtype=torch.float64) / 1000
        self.log_alpha = 0.5 * torch.log(torch.cumprod(1 - betas, dim=0))  # decreasing in t
        self.sigma_min, self.sigma_max = float(self.sigma(torch.tensor(1e-3))), float(self.sigma(torch.tensor(1.0)))

    @staticmethod
    def _interp(x, xp, fp):
        # torch piecewise-linear interpolation with linear extrapolation at both ends; xp increasing
        idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1])).clamp(1, len(xp) - 1)
        x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
        return f0 + (x - x0) * (f1 - f0) / (x1 - x0)

    def sigma(self, t):
        t = torch.as_tensor(t)
        log_alpha = self._interp(t.double().reshape(-1), self.t_keys, self.log_alpha)
        return torch.sqrt(torch.expm1(-2 * log_alpha)).to(t.dtype).reshape(-1)

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        log_alpha = -0.5 * torch.log1p(sigma.double().reshape(-1) ** 2)  # alpha² = 1 / (1 + sigma²)
        t = self._interp(log_alpha, self.log_alpha.flip(0), self.t_keys.flip(0))
        return t.to(sigma.dtype)


def numpy_discrete_sigma(net):
    """sigma(t) and its inverse computed with numpy from the same alphas_cumprod (independent of the torch path)."""
    t_keys, log_alpha = net.t_keys.numpy(), net.log_alpha.numpy()

    def interp(x, xp, fp):  # np.interp, but extrapolating linearly like the paper's interpolate_fn
        x = np.asarray(x, dtype=np.float64)
        lo = fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
        hi = fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        return np.where(x < xp[0], lo, np.where(x > xp[-1], hi, np.interp(x, xp, fp)))

    sigma = lambda t: np.sqrt(np.expm1(-2 * interp(t, t_keys, log_alpha)))
    sigma_inv = lambda s: interp(-0.5 * np.log1p(np.asarray(s) ** 2), log_alpha[::-1], t_keys[::-1])
    return sigma, sigma_inv


@pytest.mark.parametrize("schedule_type", ["polynomial", "logsnr", "time_uniform"])
@pytest.mark.parametrize("num_steps", [2, 3, 18])
def test_endpoints_and_monotone(schedule_type, num_steps):
    t = get_schedule(num_steps, SIGMA_MIN, SIGMA_MAX, schedule_type=schedule_type, schedule_rho=7)
    assert t.dtype == torch.float32 and t.shape == (num_steps,) and t.device.type == "cpu"
    assert t[0].item() == pytest.approx(SIGMA_MAX, rel=1e-6)
    assert t[-1].item() == pytest.approx(SIGMA_MIN, rel=1e-5)
    assert bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
def test_polynomial_matches_edm_formula(rho):
    n = 11
    t = get_schedule(n, SIGMA_MIN, SIGMA_MAX, schedule_type="polynomial", schedule_rho=rho).double().numpy()
    i = np.arange(n)
    expected = (SIGMA_MAX ** (1 / rho) + i / (n - 1) * (SIGMA_MIN ** (1 / rho) - SIGMA_MAX ** (1 / rho))) ** rho
    np.testing.assert_allclose(t, expected, rtol=2e-6)
    # t^(1/rho) is an arithmetic sequence
    steps = np.diff(t ** (1 / rho))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-4)


def test_logsnr_uniform_in_log_sigma():
    t = get_schedule(9, SIGMA_MIN, SIGMA_MAX, schedule_type="logsnr").double().numpy()
    np.testing.assert_allclose(np.diff(np.log(t)), (math.log(SIGMA_MIN) - math.log(SIGMA_MAX)) / 8, rtol=1e-5)


@pytest.mark.parametrize("rho", [1.0, 7.0])
def test_time_uniform_is_uniform_in_vp_time(rho):
    n = 13
    t = get_schedule(n, SIGMA_MIN, SIGMA_MAX, schedule_type="time_uniform", schedule_rho=rho).double().numpy()
    # Solve the two endpoint conditions log(1 + sigma²) = beta_d/2 · t² + beta_min · t for (beta_d, beta_min)
    # and map each returned sigma back to VP time with the quadratic formula.
    a = np.array([[0.5, 1.0], [0.5 * VP_EPS_S ** 2, VP_EPS_S]])
    beta_d, beta_min = np.linalg.solve(a, np.log1p(np.array([SIGMA_MAX, SIGMA_MIN]) ** 2))
    vp_t = (-beta_min + np.sqrt(beta_min ** 2 + 2 * beta_d * np.log1p(t ** 2))) / beta_d
    expected = (1 + np.arange(n) / (n - 1) * (VP_EPS_S ** (1 / rho) - 1)) ** rho
    np.testing.assert_allclose(vp_t, expected, rtol=1e-4)


@pytest.mark.parametrize("sigma_max_from_net", [True, False])
def test_discrete_follows_spec_formula(sigma_max_from_net):
    net = DiscreteTimeNet()
    sigma_np, sigma_inv_np = numpy_discrete_sigma(net)
    sigma_min, rho, n = 0.006, 7.0, 8
    sigma_max = net.sigma_max if sigma_max_from_net else 5.0
    t = get_schedule(n, sigma_min, sigma_max, schedule_type="discrete", schedule_rho=rho, net=net)
    assert t.dtype == torch.float32 and t.shape == (n,)

    t_max, t_min = sigma_inv_np(sigma_max), sigma_inv_np(sigma_min)
    tau = (t_max + np.arange(n) / (n - 1) * (t_min ** (1 / rho) - t_max)) ** rho  # t_max not raised (design §3)
    np.testing.assert_allclose(t.double().numpy(), sigma_np(tau), rtol=1e-5)
    assert t[-1].item() == pytest.approx(sigma_min, rel=1e-4)
    if sigma_max_from_net:  # t_max = 1, so the quirk is invisible and t_0 = sigma(1)
        assert t[0].item() == pytest.approx(net.sigma_max, rel=1e-5)
    else:  # the quirk: t_0 = sigma(t_max^rho), well below sigma_max
        assert t[0].item() == pytest.approx(float(sigma_np(t_max ** rho)), rel=1e-5)
        assert t[0].item() < 0.9 * sigma_max


def test_discrete_unwraps_ddp_module():
    class Wrapper:
        def __init__(self, module):
            self.module = module

    net = DiscreteTimeNet()
    direct = get_schedule(6, 0.01, net.sigma_max, schedule_type="discrete", net=net)
    wrapped = get_schedule(6, 0.01, net.sigma_max, schedule_type="discrete", net=Wrapper(net))
    assert torch.equal(direct, wrapped)


@pytest.mark.parametrize("num_steps", [1, 0, -3, 2.0, True])
def test_num_steps_below_two_rejected(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(num_steps, SIGMA_MIN, SIGMA_MAX)


def test_bad_schedule_arguments_rejected():
    with pytest.raises(ValueError, match="unknown schedule_type 'cosine'"):
        get_schedule(5, SIGMA_MIN, SIGMA_MAX, schedule_type="cosine")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        get_schedule(5, 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        get_schedule(5, 0.0, 80.0)
    with pytest.raises(ValueError, match="schedule_rho"):
        get_schedule(5, SIGMA_MIN, SIGMA_MAX, schedule_rho=0)
    with pytest.raises(ValueError, match="discrete time steps"):
        get_schedule(5, SIGMA_MIN, SIGMA_MAX, schedule_type="discrete")
    with pytest.raises(ValueError, match="discrete time steps"):
        get_schedule(5, SIGMA_MIN, SIGMA_MAX, schedule_type="discrete", net=object())


@pytest.mark.parametrize("rho", [1.0, 7.0])
def test_discrete_schedule_of_the_ldm_wrapper_is_computed_in_float64(rho):
    from models.latent.precond import LatentDiffusionPrecond
    from tests.latent_tiny import TINY_LDM

    net = LatentDiffusionPrecond(config=dict(TINY_LDM, schedule=dict(timesteps=1000, linear_start=0.0015,
                                                                      linear_end=0.0195)))
    t = get_schedule(4, 0.006, net.sigma_max, schedule_type="discrete", schedule_rho=rho, net=net)
    assert t.dtype == torch.float32
    # The end point is sigma(sigma_inv(0.006)): exact up to the final float32 rounding.
    assert t[-1].item() == pytest.approx(0.006, rel=1e-6)
    assert t[0].item() == pytest.approx(net.sigma_max, rel=1e-6)

"""The solver library (design §4): convergence orders on Gaussian data, agreement on a Gaussian mixture, AFS and
NFE accounting, trajectories, argument forwarding, thresholding, and bad input."""

import math

import numpy as np
import pytest
import torch

from solvers import (SOLVERS, TABLE, dpm_2_sampler, dpm_pp_sampler, dynamic_threshold,
                     euler_sampler, euler_step, get_schedule, heun_sampler, ipndm_sampler, nfe_of)
from solvers.dpm_solver_pp import multistep_update

F64 = torch.float64


class GaussianDenoiser:
    """Ideal denoiser of y ~ N(mu, s² I): D(x, sigma) = (s² x + sigma² mu) / (s² + sigma²).

    Records max |D| (so a test can show DPM-Solver++'s thresholding stayed the identity) and counts calls."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, mu, s):
        self.mu, self.s = mu, s
        self.max_abs = 0.0
        self.calls = 0

    def __call__(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None,
                 step_condition=None):
        self.calls += 1
        out = (self.s ** 2 * x + sigma ** 2 * self.mu) / (self.s ** 2 + sigma ** 2)
        self.max_abs = max(self.max_abs, out.abs().max().item())
        return out

    def exact(self, latents, t_first, t_last):
        """The PF-ODE solution at t_last from x(t_first) = latents·t_first."""
        s2 = self.s ** 2
        return self.mu + (latents * t_first - self.mu) * math.sqrt(s2 + t_last ** 2) / math.sqrt(s2 + t_first ** 2)


class MixtureDenoiser:
    """Ideal denoiser (posterior mean) of a mixture of isotropic Gaussians: curved PF-ODE trajectories."""

    def __init__(self):
        self.w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
        self.mu = torch.tensor([[0.5, 0.4], [-0.5, 0.1], [0.0, -0.5]], dtype=F64)
        self.s = torch.tensor([0.1, 0.2, 0.15], dtype=F64)

    def __call__(self, x, sigma, **conditions):
        flat = x.reshape(x.shape[0], -1)
        var = self.s ** 2 + sigma ** 2
        sq_dist = ((flat[:, None, :] - self.mu[None]) ** 2).sum(-1)
        log_p = torch.log(self.w) - sq_dist / (2 * var) - 0.5 * flat.shape[1] * torch.log(2 * math.pi * var)
        resp = torch.softmax(log_p, dim=1)
        means = (self.s[None, :, None] ** 2 * flat[:, None, :] + sigma ** 2 * self.mu[None]) / var[None, :, None]
        return (resp[:, :, None] * means).sum(1).reshape(x.shape)


class RecordingNet:
    """Counts calls and keeps what each call received; D(x) = 0.5·x."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        self.records = []

    @property
    def calls(self):
        return len(self.records)

    def __call__(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None,
                 step_condition=None):
        self.records.append(dict(sigma=sigma, class_labels=class_labels, condition=condition,
                                 unconditional_condition=unconditional_condition, step_condition=step_condition))
        return 0.5 * x


def forbidden_net(x, sigma, **conditions):
    raise AssertionError("the network must not be called here")


def observed_orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


# Every solver with each of its option settings that changes the computation.
SOLVER_CASES = [
    ("euler", {}), ("heun", {}), ("dpm", {}), ("dpm", {"r": 0.3}),
    *[("ipndm", {"max_order": k}) for k in (1, 2, 3, 4)],
    *[("dpmpp", {"max_order": k}) for k in (1, 2, 3)],
    ("dpmpp", {"max_order": 3, "predict_x0": False}), ("dpmpp", {"max_order": 2, "lower_order_final": False}),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in SOLVER_CASES]


# ---------------------------------------------------------------------------------------------------------------
# Convergence order on Gaussian data (closed-form denoiser and exact PF-ODE solution), float64.
# s = 1 and sigma in [1, 20] keep the trajectory's derivatives of one sign, so the leading error term does not
# cancel; latents in [-0.8, 0.8] and |mu| <= 0.2 keep |D| < 1, so DPM-Solver++'s thresholding is the identity.

def gaussian_problem():
    gen = torch.Generator().manual_seed(0)
    mu = (torch.rand(1, 3, 3, generator=gen, dtype=F64) - 0.5) * 0.4
    latents = (torch.rand(2, 1, 3, 3, generator=gen, dtype=F64) * 2 - 1) * 0.8
    return GaussianDenoiser(mu, s=1.0), latents


def final_errors(name, options, step_counts, grid):
    net, latents = gaussian_problem()
    errors = []
    for steps in step_counts:
        if grid == "logsnr":
            t_steps = get_schedule(steps + 1, 1.0, 20.0, schedule_type="logsnr")
        else:  # equal steps in t, where Adams–Bashforth weights are exact
            t_steps = torch.linspace(20.0, 1.0, steps + 1, dtype=F64)
        x = SOLVERS[name](net, latents, t_steps=t_steps, **options)
        assert x.dtype == F64
        t = t_steps.double()
        errors.append((x - net.exact(latents, t[0].item(), t[-1].item())).abs().max().item())
    assert net.max_abs < 1
    return errors


@pytest.mark.parametrize("name, options, grid, step_counts, order", [
    ("euler", {}, "logsnr", (8, 16, 32, 64), 1),
    ("heun", {}, "logsnr", (8, 16, 32, 64), 2),
    ("dpm", {}, "logsnr", (8, 16, 32, 64), 2),
    ("ipndm", {"max_order": 1}, "uniform", (128, 256, 512, 1024), 1),
    ("ipndm", {"max_order": 2}, "uniform", (128, 256, 512, 1024), 2),
    ("ipndm", {"max_order": 3}, "uniform", (128, 256, 512, 1024), 3),
    ("ipndm", {"max_order": 4}, "uniform", (128, 256, 512, 1024), 4),
    ("dpmpp", {"max_order": 1}, "logsnr", (8, 16, 32, 64), 1),
    ("dpmpp", {"max_order": 2}, "logsnr", (8, 16, 32, 64), 2),
    ("dpmpp", {"max_order": 2, "predict_x0": False}, "logsnr", (8, 16, 32, 64), 2),
])
def test_convergence_order_on_gaussian_data(name, options, grid, step_counts, order):
    orders = observed_orders(final_errors(name, options, step_counts, grid))
    assert abs(np.mean(orders) - order) < 0.2, orders
    assert min(orders) > order - 0.3, orders


def test_ipndm_weights_assume_equal_steps():
    # On a geometric (logsnr) grid the fixed Adams–Bashforth weights are 2nd-order accurate only.
    orders = observed_orders(final_errors("ipndm", {"max_order": 4}, (64, 128, 256), "logsnr"))
    assert all(abs(o - 2) < 0.3 for o in orders), orders


def test_dpmpp_third_order_is_second_order_accurate_like_the_papers():
    # The paper's (and DPM-Solver's) 3rd-order multistep update, kept as is: globally 2nd order, but more
    # accurate than the 2nd-order update.
    err3 = final_errors("dpmpp", {"max_order": 3}, (8, 16, 32, 64), "logsnr")
    err2 = final_errors("dpmpp", {"max_order": 2}, (8, 16, 32, 64), "logsnr")
    assert abs(np.mean(observed_orders(err3)) - 2) < 0.2, observed_orders(err3)
    assert all(a < b for a, b in zip(err3, err2))


def test_dpmpp_third_order_update_coefficients():
    # One data-prediction step from lambda_0 to lambda_0 + h with D(lambda) = m0 + m1·u + m2·u²/2 (u = lambda -
    # lambda_0) known at three equally spaced past points. Exact: x_t = e^-h·x + m0·(1 - e^-h) +
    # m1·(h - 1 + e^-h) + m2·(h²/2 - h + 1 - e^-h). The update is exact for m2 = 0 and, with the paper's
    # D2 = (D1_0 - D1_1)/(r0 + r1), supplies half of the m2 term.
    h, lam0, m0, m1, x = 0.3, 0.2, 0.7, -0.4, 1.3
    times = [torch.tensor(math.exp(-(lam0 - k * h)), dtype=F64) for k in range(3)]
    t_next = torch.tensor(math.exp(-(lam0 + h)), dtype=F64)
    e = math.exp(-h)
    m2_term = h * h / 2 - h + 1 - e
    for m2, missing in ((0.0, 0.0), (1.5, 0.5 * 1.5 * m2_term)):
        models = [torch.tensor(m0 - k * h * m1 + (k * h) ** 2 * m2 / 2, dtype=F64) for k in range(3)]
        exact = e * x + m0 * (1 - e) + m1 * (h - 1 + e) + m2 * m2_term
        got = multistep_update(torch.tensor(x, dtype=F64), models, times, t_next, predict_x0=True).item()
        assert got == pytest.approx(exact - missing, abs=1e-13)


def papers_dpm_pp(net, latents, t_steps, max_order, predict_x0, first_weight=lambda r0, r1: r0 / (r0 + r1)):
    """An independent transcription of the paper's multistep DPM-Solver++ (sfd-main solver_utils.py, VE form),
    written out per order as in DPM-Solver's equations, with Imagen's thresholding through torch.quantile.

    first_weight is the weight of (D1_0 - D1_1) in D1; the paper's is r0/(r0 + r1)."""
    n = len(t_steps)
    lam = [-math.log(t) for t in t_steps]
    x = latents * t_steps[0]
    past = []  # (model output, lambda), newest last
    for i in range(n - 1):
        denoised = net(x, torch.tensor(t_steps[i], dtype=F64))
        if predict_x0:
            s = torch.quantile(denoised.abs().reshape(len(x), -1), 0.995, dim=1).clamp(min=1).reshape(-1, 1, 1, 1)
            model = denoised.clamp(-s, s) / s
        else:
            model = (x - denoised) / t_steps[i]
        past.append((model, lam[i]))
        order = i + 1 if i + 1 < max_order else min(max_order, n - (i + 1))   # lower_order_final
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h) if predict_x0 else math.expm1(h)
        ratio, t_next = t_steps[i + 1] / t_steps[i], t_steps[i + 1]
        m0 = past[-1][0]
        if order == 1:
            x = ratio * x - phi1 * m0 if predict_x0 else x - t_next * phi1 * m0
        elif order == 2:
            r0 = (past[-1][1] - past[-2][1]) / h
            d1 = (m0 - past[-2][0]) / r0
            x = (ratio * x - phi1 * m0 - 0.5 * phi1 * d1 if predict_x0
                 else x - t_next * phi1 * m0 - 0.5 * t_next * phi1 * d1)
        else:
            r0, r1 = (past[-1][1] - past[-2][1]) / h, (past[-2][1] - past[-3][1]) / h
            d1_0, d1_1 = (m0 - past[-2][0]) / r0, (past[-2][0] - past[-3][0]) / r1
            d1 = d1_0 + first_weight(r0, r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            if predict_x0:
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                x = ratio * x - phi1 * m0 + phi2 * d1 - phi3 * d2
            else:
                phi2 = phi1 / h - 1
                phi3 = phi2 / h - 0.5
                x = x - t_next * (phi1 * m0 + phi2 * d1 + phi3 * d2)
    return x


@pytest.mark.parametrize("predict_x0", [True, False], ids=["data", "noise"])
def test_dpmpp_third_order_matches_the_papers_update_on_an_uneven_schedule(predict_x0):
    # EDM's polynomial schedule is uneven in lambda (r0 != r1), so the weight r0/(r0 + r1) of D1 shows; the mixture
    # denoiser is far from linear in lambda, so every term of the update matters. Both sides run in float64:
    # 1e-10 relative leaves room for rounding only.
    net = MixtureDenoiser()
    latents = torch.randn(6, 1, 1, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    t_steps = get_schedule(8, 0.02, 10.0, schedule_type="polynomial", schedule_rho=7).double().tolist()
    lam = [-math.log(t) for t in t_steps]
    spacing = [b - a for a, b in zip(lam, lam[1:])]
    assert max(spacing) / min(spacing) > 2  # r0 and r1 differ a lot
    ours = dpm_pp_sampler(net, latents, t_steps=t_steps, max_order=3, predict_x0=predict_x0)
    papers = papers_dpm_pp(net, latents, t_steps, 3, predict_x0)
    torch.testing.assert_close(ours, papers, rtol=1e-10, atol=1e-10)
    # The test can see the weight: the swapped weight r1/(r0 + r1) moves the result by far more than the tolerance.
    swapped = papers_dpm_pp(net, latents, t_steps, 3, predict_x0, first_weight=lambda r0, r1: r1 / (r0 + r1))
    assert (swapped - papers).abs().max() > 1e-3 * papers.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# Gaussian mixture: every solver converges to the endpoint of a fine Heun reference.

def test_all_solvers_converge_on_gaussian_mixture():
    net = MixtureDenoiser()
    latents = torch.randn(8, 1, 1, 2, generator=torch.Generator().manual_seed(1), dtype=F64).clamp(-2.5, 2.5)
    settings = dict(sigma_min=0.02, sigma_max=10.0, schedule_type="polynomial", schedule_rho=7)
    reference = heun_sampler(net, latents, num_steps=401, **settings)
    one_step = (euler_sampler(net, latents, num_steps=2, **settings) - reference).abs().max().item()
    assert one_step > 0.3  # the trajectories are curved: one Euler step lands far off
    for name, options in [*((name, {}) for name in SOLVERS), ("dpmpp", {"predict_x0": False})]:
        coarse, fine = (
            (SOLVERS[name](net, latents, num_steps=n, **settings, **options) - reference).abs().max().item()
            for n in (17, 65)
        )
        assert fine < coarse / 2, (name, options, coarse, fine)
        assert fine < (2e-2 if name == "euler" else 2e-3), (name, options, fine)


# ---------------------------------------------------------------------------------------------------------------
# AFS and NFE.

@pytest.mark.parametrize("name, options", SOLVER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_steps", [2, 3, 6])
def test_afs_saves_exactly_one_call_and_nfe_of_counts(name, options, num_steps):
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for afs in (False, True):
        for denoise_to_zero in (False, True):
            net = RecordingNet()
            SOLVERS[name](net, latents, num_steps=num_steps, afs=afs, denoise_to_zero=denoise_to_zero, **options)
            assert net.calls == nfe_of(name, num_steps, afs=afs, denoise_to_zero=denoise_to_zero, **options)
    assert nfe_of(name, num_steps, afs=False) - nfe_of(name, num_steps, afs=True) == 1


def test_nfe_of_values():
    assert nfe_of("euler", 4, afs=True) == 2                          # design §4: num_steps - 2 with AFS
    assert nfe_of("euler", 4) == 3
    assert nfe_of("heun", 4) == 6 and nfe_of("dpm", 4, afs=True) == 5
    assert nfe_of("dpmpp", 6, max_order=3, predict_x0=True, lower_order_final=True) == 5


def test_afs_first_dpmpp_step_stores_x_minus_t_d():
    # the stored data estimate is x - t0·d_AFS = x·(1 - t0/sqrt(1 + t0²)), thresholded, then one 1st-order step
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 500
    t0, t1 = 80.0, 10.0
    x = dpm_pp_sampler(forbidden_net, latents, t_steps=[t0, t1], afs=True)
    x0 = latents * t0
    data = dynamic_threshold(x0 - t0 * x0 / math.sqrt(1 + t0 ** 2))
    assert not torch.allclose(data, x0 - t0 * x0 / math.sqrt(1 + t0 ** 2))  # thresholding was active
    torch.testing.assert_close(x, (t1 / t0) * x0 - math.expm1(-math.log(t0 / t1)) * data)


def expected_sigmas(name, options, t, afs):
    """The noise levels a solver's network calls see, in order, on the time points t (AFS skips t_0's call)."""
    seen = []
    for i in range(len(t) - 1):
        if not (afs and i == 0):
            seen.append(t[i])
        if name == "heun":
            seen.append(t[i + 1])                                   # corrector at the predicted point
        elif name == "dpm":
            r = options.get("r", 0.5)
            seen.append(t[i + 1] ** r * t[i] ** (1 - r))            # intermediate point
    return seen


def expected_first_step(name, options, x0, t0, t1):
    """x at t_1 after an AFS first step, D(x) = x/2 (RecordingNet) for the further calls of Heun and DPM-2."""
    d = x0 / math.sqrt(1 + t0 ** 2)                                  # the analytical slope
    h = t1 - t0
    if name == "heun":
        x_pred = x0 + h * d
        return x0 + h * (0.5 * d + 0.5 * (0.5 * x_pred / t1))
    if name == "dpm":
        r = options.get("r", 0.5)
        t_mid = t1 ** r * t0 ** (1 - r)
        x_mid = x0 + (t_mid - t0) * d
        return x0 + h * (1 / (2 * r) * (0.5 * x_mid / t_mid) + (1 - 1 / (2 * r)) * d)
    return x0 + h * d  # Euler; 1st-order iPNDM and DPM-Solver++ are Euler in the VE form


@pytest.mark.parametrize("name, options", SOLVER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_steps", [4, 6])
def test_afs_replaces_the_first_network_call_only(name, options, num_steps):
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = [(80 ** (1 / 7) + k / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for k in range(num_steps)]
    for afs in (False, True):
        net = RecordingNet()
        traj = SOLVERS[name](net, latents, num_steps=num_steps, afs=afs, return_inters=True, **options)
        seen = [float(r["sigma"]) for r in net.records]
        assert seen == pytest.approx(expected_sigmas(name, options, t, afs), rel=1e-6), (afs, seen)
    # The AFS step's result comes from d = x/sqrt(1 + t_0²) (the schedule is float32, as the sampler keeps it).
    t0, t1 = (torch.tensor(v, dtype=torch.float32).double() for v in t[:2])
    torch.testing.assert_close(traj[1], expected_first_step(name, options, latents * t0, t0, t1), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Special cases that reduce to Euler or Heun.

@pytest.mark.parametrize("name, options, same_as", [
    ("ipndm", {"max_order": 1}, euler_sampler),   # Adams–Bashforth of order 1 is Euler
    ("dpmpp", {"max_order": 1}, euler_sampler),   # 1st-order DPM-Solver++ in the VE form is DDIM = Euler
    ("dpm", {"r": 1.0}, heun_sampler),            # DPM-2 evaluated at t_next with weights ½, ½ is Heun
])
def test_special_cases_reduce_to_euler_or_heun(name, options, same_as):
    latents = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.01
    net = lambda x, sigma, **conditions: x / (1 + sigma ** 2)
    kwargs = dict(num_steps=7, sigma_min=0.1, sigma_max=10.0, afs=True)
    got = SOLVERS[name](net, latents, **kwargs, **options)
    torch.testing.assert_close(got, same_as(net, latents, **kwargs), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Trajectories, forwarding, dtypes.

@pytest.mark.parametrize("name, options", SOLVER_CASES, ids=CASE_IDS)
def test_return_inters(name, options):
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    net = RecordingNet()
    final = SOLVERS[name](net, latents, num_steps=5, **options)
    traj = SOLVERS[name](net, latents, num_steps=5, return_inters=True, **options)
    assert traj.shape == (5, 2, 3, 4, 4)
    torch.testing.assert_close(traj[0], latents * 80.0)
    torch.testing.assert_close(traj[-1], final)
    traj0 = SOLVERS[name](net, latents, num_steps=5, return_inters=True, denoise_to_zero=True, **options)
    assert traj0.shape == (6, 2, 3, 4, 4)
    torch.testing.assert_close(traj0[:-1], traj)
    torch.testing.assert_close(traj0[-1], 0.5 * traj[-1])  # RecordingNet's D(x) = x/2 at t_last
    assert net.records[-1]["sigma"].item() == pytest.approx(0.002)


@pytest.mark.parametrize("name, options", SOLVER_CASES, ids=CASE_IDS)
def test_conditions_reach_the_net_unchanged(name, options):
    latents = torch.randn(2, 3, 4, 4)
    labels, cond, uncond = torch.eye(10)[:2], torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    net = RecordingNet()
    SOLVERS[name](net, latents, class_labels=labels, condition=cond, unconditional_condition=uncond,
                  num_steps=4, step_condition=5, denoise_to_zero=True, **options)
    assert net.calls > 0
    for record in net.records:
        assert record["class_labels"] is labels and record["condition"] is cond
        assert record["unconditional_condition"] is uncond
        assert record["step_condition"] == 5 and type(record["step_condition"]) is int
        sigma = record["sigma"]
        assert isinstance(sigma, torch.Tensor) and sigma.dim() == 0 and sigma.dtype == torch.float32
        assert sigma.device == latents.device


def test_default_schedule_path_equals_explicit_t_steps():
    latents = torch.randn(2, 3, 4, 4)
    net = RecordingNet()
    for schedule_type in ("polynomial", "logsnr", "time_uniform"):
        a = ipndm_sampler(net, latents, num_steps=6, sigma_min=0.01, sigma_max=40, schedule_type=schedule_type,
                          schedule_rho=5)
        t = get_schedule(6, 0.01, 40, schedule_type=schedule_type, schedule_rho=5)
        torch.testing.assert_close(a, ipndm_sampler(net, latents, t_steps=t), rtol=0, atol=0)


def test_schedule_is_built_and_checked_once_per_setting(monkeypatch):
    """The sampling loop reads nothing back from the device per call: a setting's schedule is built (and its values
    checked, a device-to-host read) once, then reused; a new setting builds a new one; user t_steps are checked."""
    import solvers.sampling as sampling

    sampling._built_schedule.cache_clear()
    built = []
    real = sampling.get_schedule
    monkeypatch.setattr(sampling, "get_schedule", lambda *a, **k: built.append(a) or real(*a, **k))
    net, latents = RecordingNet(), torch.randn(2, 1, 4, 4)
    first = euler_sampler(net, latents, num_steps=5, sigma_min=0.02, sigma_max=30)
    again = euler_sampler(net, latents, num_steps=5, sigma_min=0.02, sigma_max=30)
    assert len(built) == 1 and torch.equal(first, again)
    euler_sampler(net, latents, num_steps=6, sigma_min=0.02, sigma_max=30)
    euler_sampler(net, latents.double(), num_steps=5, sigma_min=0.02, sigma_max=30)
    assert len(built) == 3
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler_sampler(net, latents, t_steps=[1.0, 2.0])


@pytest.mark.parametrize("name, options", SOLVER_CASES, ids=CASE_IDS)
def test_float64_in_float64_out(name, options):
    net, latents = gaussian_problem()
    assert SOLVERS[name](net, latents, num_steps=4, **options).dtype == F64


# ---------------------------------------------------------------------------------------------------------------
# euler_step: the SFD student step.

class TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None,
                step_condition=None):
        return self.conv(x / (1 + sigma ** 2).sqrt())


def test_euler_step_is_differentiable_and_matches_the_sampler():
    torch.manual_seed(0)
    net = TinyDenoiser()
    latents = torch.randn(2, 3, 4, 4)
    t0, t1 = 80.0, 20.0
    x1 = euler_step(net, latents * t0, t0, t1)
    torch.testing.assert_close(x1, euler_sampler(net, latents, t_steps=[t0, t1]))
    x1.abs().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_euler_step_with_afs_calls_no_network():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    x1 = euler_step(forbidden_net, x, torch.tensor(80.0), torch.tensor(20.0), afs=True)
    torch.testing.assert_close(x1, x - 60.0 * x / math.sqrt(1 + 80.0 ** 2))
    x1.sum().backward()
    assert x.grad is not None


def test_euler_step_forwards_conditions():
    net = RecordingNet()
    labels = torch.eye(10)[:2]
    euler_step(net, torch.randn(2, 3, 4, 4), 5.0, 2.0, class_labels=labels, step_condition=3)
    assert net.records[0]["class_labels"] is labels and net.records[0]["step_condition"] == 3
    assert net.records[0]["sigma"].dim() == 0 and net.records[0]["sigma"].item() == 5.0


# ---------------------------------------------------------------------------------------------------------------
# Dynamic thresholding (DPM-Solver++ data estimates).

def test_dynamic_threshold_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=gen) * torch.tensor([0.2, 1.0, 3.0, 10.0]).view(4, 1, 1, 1)
    got = dynamic_threshold(x0)
    a = x0.double().numpy()
    q = np.quantile(np.abs(a).reshape(4, -1), 0.995, axis=1)
    s = np.maximum(q, 1.0).reshape(4, 1, 1, 1)
    np.testing.assert_allclose(got.double().numpy(), np.clip(a, -s, s) / s, rtol=1e-6, atol=1e-7)
    assert x0[0].abs().max() < 1
    torch.testing.assert_close(got[0], x0[0])             # |x0| < 1 everywhere: untouched
    assert got[3].abs().max() <= 1 and not torch.allclose(got[3], x0[3])
    half = dynamic_threshold(x0.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), got, rtol=1e-2, atol=1e-2)


def test_dpmpp_thresholds_every_data_estimate():
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    big = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * 5
    net = lambda x, sigma, **c: big
    t0, t1 = 10.0, 2.0
    x = dpm_pp_sampler(net, latents, t_steps=[t0, t1])
    expected = (t1 / t0) * latents * t0 - math.expm1(-math.log(t0 / t1)) * dynamic_threshold(big)
    torch.testing.assert_close(x, expected)
    unthresholded = (t1 / t0) * latents * t0 - math.expm1(-math.log(t0 / t1)) * big
    assert not torch.allclose(x, unthresholded)
    # noise prediction keeps the raw slope
    x_eps = dpm_pp_sampler(net, latents, t_steps=[t0, t1], predict_x0=False)
    torch.testing.assert_close(x_eps, unthresholded)
    # thresholding=False: the raw data estimate (an option; the paper's code always thresholds)
    torch.testing.assert_close(dpm_pp_sampler(net, latents, t_steps=[t0, t1], thresholding=False), unthresholded)


def test_dpmpp_order_schedule():
    from solvers.dpm_solver_pp import dpm_pp_order
    assert [dpm_pp_order(i, 6, 3, True) for i in range(5)] == [1, 2, 3, 2, 1]
    assert [dpm_pp_order(i, 6, 3, False) for i in range(5)] == [1, 2, 3, 3, 3]
    assert [dpm_pp_order(i, 3, 3, True) for i in range(2)] == [1, 2]  # warm-up wins over lowering
    assert [dpm_pp_order(i, 4, 1, True) for i in range(3)] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Registry and bad input.

OTHER_OPTION_VALUE = dict(r=0.3, max_order=2, predict_x0=False, lower_order_final=False, thresholding=False)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_the_tables_option_defaults_are_what_each_sampler_runs(name):
    """A sampler called without its options runs exactly the table's defaults, and each option reaches the rule
    (another value changes the samples), so the table cannot say one thing while the samplers run another."""
    spec = TABLE[name]
    assert SOLVERS[name] is spec.sampler and spec.name == name
    net = GaussianDenoiser(mu=3.0, s=0.5)  # data beyond ±1: dynamic thresholding changes the predictions
    latents = torch.randn(2, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(num_steps=7, sigma_min=0.002, sigma_max=80.0)
    plain = spec.sampler(net, latents, **kw)
    assert torch.equal(plain, spec.sampler(net, latents, **kw, **spec.options))
    for option in spec.options:
        other = spec.sampler(net, latents, **kw, **dict(spec.options, **{option: OTHER_OPTION_VALUE[option]}))
        assert not torch.equal(plain, other), option


def test_bad_inputs_are_clear_value_errors():
    latents = torch.randn(1, 1, 2, 2)
    net = RecordingNet()
    with pytest.raises(ValueError, match="num_steps"):
        euler_sampler(net, latents, num_steps=1)
    with pytest.raises(ValueError, match="num_steps"):
        heun_sampler(net, latents)
    with pytest.raises(ValueError, match="unknown schedule_type 'karras'"):
        dpm_2_sampler(net, latents, num_steps=4, schedule_type="karras")
    for bad in (0, 5, 2.5, True):
        with pytest.raises(ValueError, match="ipndm_sampler: max_order must be an int in 1..4"):
            ipndm_sampler(net, latents, num_steps=4, max_order=bad)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="dpm_pp_sampler: max_order must be an int in 1..3"):
            dpm_pp_sampler(net, latents, num_steps=4, max_order=bad)
    with pytest.raises(ValueError, match="r must be"):
        dpm_2_sampler(net, latents, num_steps=4, r=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler_sampler(net, latents, t_steps=[1.0, 2.0])
    with pytest.raises(ValueError, match="denoise_to_zero"):
        heun_sampler(net, latents, t_steps=[1.0, 0.0])
    with pytest.raises(ValueError, match="disagrees"):
        euler_sampler(net, latents, num_steps=3, t_steps=[2.0, 1.0])
    with pytest.raises(ValueError, match="discrete time steps"):
        euler_sampler(net, latents, num_steps=3, schedule_type="discrete")
    with pytest.raises(ValueError, match="unknown solver 'ddim'"):
        nfe_of("ddim", 4)
    with pytest.raises(ValueError, match="has no option"):
        nfe_of("euler", 4, max_order=2)
    with pytest.raises(TypeError):
        euler_sampler(net, latents, num_steps=4, max_order=2)
    assert net.calls == 0

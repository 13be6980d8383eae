"""Our solver library against full trajectories of the paper's solvers (tests/data/reference/solver-golden.*): 33
sampler runs on EDM pickle (a) from stored latents, and 11 schedules.

Tolerances (tests/data/reference/README.md §3), per trajectory frame f:
    |got_f - exp_f| <= 1e-4 * max|exp_f| + 100 * 1.2e-7 * (largest magnitude seen in frames 0..f),
float32 rounding only, where frame 0 is latents * 80. Schedules are compared point by point, rel 1e-4 (tighter than
the frame rule). Exception, time_uniform: the paper evaluates sigma = sqrt(u), u = exp(a) - 1 with
a = beta_d t^2 / 2 + beta_min t, all in float32, and beta_min = log(1 + sigma_max^2) - beta_d / 2 cancels two ~8.8
numbers; u then carries an absolute error of up to ~16 eps32, i.e. 16 eps32 / (2 sigma) in sigma (1.3e-5 at the
paper's end point 0.0020132 for sigma_min 0.002). Ours is computed in float64 and ends at sigma_min. The same
holds for 'discrete' on VPPrecond: see test_schedule_matches_the_papers.
"""

import json
import os

import numpy as np
import pytest
import torch

import solvers
import solvers.dpm_solver_pp as dpm_solver_pp
from models import load_network

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference")
GOLDEN = json.load(open(os.path.join(REF, "solver-golden.json")))
SAMPLERS = [c for c in GOLDEN["cases"] if c["kind"] == "sampler"]
SCHEDULES = [c for c in GOLDEN["cases"] if c["kind"] == "schedule"]
assert len(SAMPLERS) == 33 and len(SCHEDULES) == 11, "tests/data/reference/solver-golden.json is incomplete"
EPS32 = float(np.finfo(np.float32).eps)

# The paper's function names -> ours (same keyword arguments).
FUNCTIONS = {"euler_sampler": solvers.euler_sampler, "heun_sampler": solvers.heun_sampler,
             "dpm_2_sampler": solvers.dpm_2_sampler, "ipndm_sampler": solvers.ipndm_sampler,
             "dpm_pp_sampler": solvers.dpm_pp_sampler}


@pytest.fixture(scope="module")
def arrays():
    return np.load(os.path.join(REF, "solver-golden.npz"))


@pytest.fixture(scope="module")
def net_a():
    return load_network(model_path=os.path.join(REF, "edm-pickles", "ddpmpp-uncond-edm-8x8.pkl")).net


@pytest.mark.parametrize("case", SAMPLERS, ids=[c["id"] for c in SAMPLERS])
def test_sampler_trajectory_matches_the_papers(case, arrays, net_a, monkeypatch):
    calls, thresholded = [], []

    def counting_net(x, sigma, **kwargs):
        calls.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return net_a(x, sigma, **kwargs)

    real_threshold = dpm_solver_pp.dynamic_threshold

    def counting_threshold(x0, *args, **kwargs):
        out = real_threshold(x0, *args, **kwargs)
        thresholded.append(not torch.equal(out, x0))
        return out

    monkeypatch.setattr(dpm_solver_pp, "dynamic_threshold", counting_threshold)
    latents = torch.from_numpy(arrays["latents"])
    with torch.no_grad():
        got = FUNCTIONS[case["fn"]](counting_net, latents, class_labels=None, return_inters=True,
                                    **case["kwargs"]).numpy()
    expected = arrays[case["array"]]
    assert got.shape == expected.shape
    seen = 0.0
    for f in range(len(expected)):
        seen = max(seen, float(np.abs(expected[f]).max()))
        tol = 1e-4 * float(np.abs(expected[f]).max()) + 100 * EPS32 * seen
        err = float(np.abs(got[f].astype(np.float64) - expected[f]).max())
        assert err <= tol, f"{case['id']} frame {f}: max|got - expected| = {err:.3e} > {tol:.3e}"
    assert len(calls) == case["nfe"], (calls, case["nfe"])
    # Dynamic thresholding of the data predictions is part of the paper's DPM-Solver++ (float32).
    if case["fn"] == "dpm_pp_sampler":
        stats = case["dynamic_thresholding"]
        assert len(thresholded) == stats["calls"] and sum(thresholded) == stats["changed_x0"], (thresholded, stats)


def vp_discrete_schedule(net, dtype, num_steps, sigma_min, sigma_max, schedule_rho, schedule_type):
    """The 'discrete' schedule through VPPrecond's sigma(t) and its inverse, in numpy at `dtype`."""
    d = np.dtype(dtype).type
    beta_d, beta_min, rho = d(net.beta_d), d(net.beta_min), d(schedule_rho)
    sigma = lambda t: np.sqrt(np.exp(d(0.5) * beta_d * t ** 2 + beta_min * t) - d(1))
    sigma_inv = lambda s: (np.sqrt(beta_min ** 2 + d(2) * beta_d * np.log(d(1) + d(s) ** 2)) - beta_min) / beta_d
    frac = (np.arange(num_steps) / (num_steps - 1)).astype(dtype)
    t_min, t_max = sigma_inv(sigma_min), sigma_inv(sigma_max)
    return sigma((t_max + frac * (t_min ** (d(1) / rho) - t_max)) ** rho).astype(np.float64)


@pytest.mark.parametrize("case", SCHEDULES, ids=[c["id"] for c in SCHEDULES])
def test_schedule_matches_the_papers(case, arrays):
    net = None
    if case["net"] is not None:  # 'discrete' needs sigma(t) / sigma_inv(sigma): EDM's VPPrecond of pickle (b)
        net = load_network(model_path=os.path.join(REF, case["net"])).net
        if case.get("sigma_max_from") == "net.sigma_max":
            assert case["kwargs"]["sigma_max"] == pytest.approx(net.sigma_max, rel=1e-7)
    got = solvers.get_schedule(net=net, **case["kwargs"]).numpy().astype(np.float64)
    expected = arrays[case["array"]].astype(np.float64)
    assert got.shape == expected.shape
    if case["kwargs"]["schedule_type"] == "discrete":
        # The paper evaluates this schedule in float32, where sigma(t) = sqrt(exp(a) - 1) cancels digits near t = 0
        # and the error of t_min spreads to every point (up to 7e-3 relative here); ours is float64. Both are the
        # same formula: ours matches its float64 evaluation, the paper's its float32 one.
        np.testing.assert_allclose(got, vp_discrete_schedule(net, np.float64, **case["kwargs"]), rtol=1e-6)
        paper32 = vp_discrete_schedule(net, np.float32, **case["kwargs"])
        np.testing.assert_allclose(expected[:-1], paper32[:-1], rtol=1e-5)
        cancellation = 16 * EPS32 / (2 * expected[-1])  # the end point: as for time_uniform
        assert abs(expected[-1] - paper32[-1]) <= cancellation and abs(expected[-1] - got[-1]) <= cancellation
        return
    tol = 1e-4 * np.abs(expected)
    if case["kwargs"]["schedule_type"] == "time_uniform":
        tol = tol + 16 * EPS32 / (2 * np.abs(expected))
    err = np.abs(got - expected)
    assert (err <= tol).all(), f"{case['id']}: got {got.tolist()}, expected {expected.tolist()}, err {err.tolist()}"

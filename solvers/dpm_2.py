"""DPM-Solver-2 in the VE form (Lu et al. 2022, Algorithm 1 with r1 = r; design §4). Two NFE per step.

Under AFS only the first slope is analytical; the evaluation at t_mid still calls the network.
"""

import functools

from .sampling import sample
from .spec import SolverSpec


def dpm_2_rule(step, history, r):
    t_mid = (step.t_next ** r) * (step.t_cur ** (1 - r))          # r of the way from t_cur to t_next in log t
    x_mid = step.x + (t_mid - step.t_cur) * step.d
    d_mid = (x_mid - step.denoise(x_mid, t_mid)) / t_mid
    # x_{i+1} = x_i + (t_{i+1} - t_i)·(d_mid/(2r) + (1 - 1/(2r))·d_i)
    d = (1 / (2 * r)) * d_mid + (1 - 1 / (2 * r)) * step.d
    return step.x + (step.t_next - step.t_cur) * d, None


def dpm_2_sampler(net, latents, **arguments):
    """DPM-Solver-2 sampler; its option r in (0, 1] places the intermediate point (SPEC: 0.5, the original
    method). The other arguments are those of `solvers.sampling.sample`."""
    options, arguments = SPEC.split(arguments)
    r = options["r"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"dpm_2_sampler: r must be a number in (0, 1], got {r!r}")
    return sample(functools.partial(dpm_2_rule, r=float(r)), net, latents, **arguments)


SPEC = SolverSpec("dpm", dpm_2_sampler, nfe_per_step=2, options=dict(r=0.5))

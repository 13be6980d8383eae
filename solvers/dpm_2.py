"""DPM-Solver-2 in the VE form (Lu et al. 2022, Algorithm 1 with r1 = r; design §4). Two NFE per step.

Under AFS only the first slope is analytical; the evaluation at t_mid still calls the network.
"""

import functools

from .sampling import sample

NFE_PER_STEP = 2


def dpm_2_rule(step, history, r):
    t_mid = (step.t_next ** r) * (step.t_cur ** (1 - r))          # r of the way from t_cur to t_next in log t
    x_mid = step.x + (t_mid - step.t_cur) * step.d
    d_mid = (x_mid - step.denoise(x_mid, t_mid)) / t_mid
    # x_{i+1} = x_i + (t_{i+1} - t_i)·(d_mid/(2r) + (1 - 1/(2r))·d_i)
    d = (1 / (2 * r)) * d_mid + (1 - 1 / (2 * r)) * step.d
    return step.x + (step.t_next - step.t_cur) * d, None


def dpm_2_sampler(net, latents, class_labels=None, condition=None, unconditional_condition=None, num_steps=None,
                  sigma_min=0.002, sigma_max=80, schedule_type="polynomial", schedule_rho=7, afs=False,
                  denoise_to_zero=False, return_inters=False, step_condition=None, t_steps=None, r=0.5):
    """DPM-Solver-2 sampler; r in (0, 1] places the intermediate point (0.5 = the original method).
    The other arguments are those of `solvers.sampling.sample`."""
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"dpm_2_sampler: r must be a number in (0, 1], got {r!r}")
    return sample(functools.partial(dpm_2_rule, r=float(r)), net, latents, class_labels, condition,
                  unconditional_condition, num_steps, sigma_min, sigma_max, schedule_type, schedule_rho, afs,
                  denoise_to_zero, return_inters, step_condition, t_steps)

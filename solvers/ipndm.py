"""Improved PNDM: Adams–Bashforth multistep on the PF-ODE slopes (Zhang & Chen 2023, "DEIS", §C / iPNDM;
design §4). One NFE per step.

The order ramps up as slopes accumulate: order = min(max_order, i + 1). max_order = 1 is plain Euler (the
paper's code crashes there while shifting its empty buffer; ours keeps the last max_order - 1 slopes, which is
none). Under AFS the analytical slope of step 0 is remembered like any other slope.

The weights are those for equal steps, applied unchanged on every schedule as in the paper's code. On
non-uniform schedules (polynomial, logsnr, ...) the method is therefore 2nd-order accurate at best; its nominal
order shows on equal steps in t (tests/test_solvers.py measures both).
"""

import functools

from .sampling import check_order, sample

NFE_PER_STEP = 1
ORDER_RANGE = (1, 4)  # allowed max_order

# Adams–Bashforth weights for the newest slope first, and their common denominator.
ADAMS_BASHFORTH = {
    1: ((1,), 1),
    2: ((3, -1), 2),
    3: ((23, -16, 5), 12),
    4: ((55, -59, 37, -9), 24),
}


def ipndm_rule(step, history, max_order):
    order = min(max_order, step.i + 1)
    slopes = (step.d,) + tuple(reversed(history))[:order - 1]
    weights, denominator = ADAMS_BASHFORTH[order]
    d = sum(w * s for w, s in zip(weights, slopes)) / denominator
    return step.x + (step.t_next - step.t_cur) * d, step.d


def ipndm_sampler(net, latents, class_labels=None, condition=None, unconditional_condition=None, num_steps=None,
                  sigma_min=0.002, sigma_max=80, schedule_type="polynomial", schedule_rho=7, afs=False,
                  denoise_to_zero=False, return_inters=False, step_condition=None, t_steps=None, max_order=4):
    """iPNDM sampler of order up to max_order (1..4); the other arguments are those of `solvers.sampling.sample`."""
    max_order = check_order("max_order", max_order, *ORDER_RANGE, "ipndm_sampler")
    return sample(functools.partial(ipndm_rule, max_order=max_order), net, latents, class_labels, condition,
                  unconditional_condition, num_steps, sigma_min, sigma_max, schedule_type, schedule_rho, afs,
                  denoise_to_zero, return_inters, step_condition, t_steps)

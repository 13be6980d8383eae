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

from .sampling import sample
from .spec import SolverSpec

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


def ipndm_sampler(net, latents, **arguments):
    """iPNDM sampler of order up to max_order (SPEC.order_range; default SPEC.options); the other arguments are
    those of `solvers.sampling.sample`."""
    options, arguments = SPEC.split(arguments)
    return sample(functools.partial(ipndm_rule, **options), net, latents, **arguments)


SPEC = SolverSpec("ipndm", ipndm_sampler, nfe_per_step=1, options=dict(max_order=4), order_range=(1, 4))

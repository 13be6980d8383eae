"""The solver library: schedules, one sampling loop, and a small step rule per solver (design §3-4).

SOLVERS maps the names of the paper's `--sampler_tea` option to the samplers; SOLVER_OPTIONS lists each
solver's own options with their defaults; nfe_of counts the network calls of a run.
"""

from . import dpm_2, dpm_solver_pp, euler, heun, ipndm
from .afs import afs_slope
from .dpm_2 import dpm_2_sampler
from .dpm_solver_pp import dpm_pp_sampler, dynamic_threshold
from .euler import euler_sampler, euler_step
from .heun import heun_sampler
from .ipndm import ipndm_sampler
from .sampling import sample
from .schedules import SCHEDULE_TYPES, get_schedule

SOLVERS = {
    "euler": euler_sampler,
    "heun": heun_sampler,
    "dpm": dpm_2_sampler,
    "ipndm": ipndm_sampler,
    "dpmpp": dpm_pp_sampler,
}

SOLVER_OPTIONS = {
    "euler": {},
    "heun": {},
    "dpm": {"r": 0.5},
    "ipndm": {"max_order": 4},
    "dpmpp": {"max_order": 3, "predict_x0": True, "lower_order_final": True, "thresholding": True},
}

# Allowed max_order of the multistep solvers (what check_order enforces inside them).
ORDER_RANGE = {"ipndm": ipndm.ORDER_RANGE, "dpmpp": dpm_solver_pp.ORDER_RANGE}

_NFE_PER_STEP = {
    "euler": euler.NFE_PER_STEP,
    "heun": heun.NFE_PER_STEP,
    "dpm": dpm_2.NFE_PER_STEP,
    "ipndm": ipndm.NFE_PER_STEP,
    "dpmpp": dpm_solver_pp.NFE_PER_STEP,
}


def nfe_of(solver_name, num_steps, afs=False, denoise_to_zero=False, **options):
    """Network calls made by SOLVERS[solver_name] over num_steps time points (num_steps - 1 steps).

    AFS replaces the first call; denoise_to_zero adds one. Classifier-free guidance doubles each call inside the
    network and is not counted here.
    """
    if solver_name not in SOLVERS:
        raise ValueError(f"unknown solver {solver_name!r}; choose one of {', '.join(SOLVERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    unknown = sorted(set(options) - set(SOLVER_OPTIONS[solver_name]))
    if unknown:
        raise ValueError(f"solver {solver_name!r} has no option(s) {', '.join(unknown)}; "
                         f"its options are {sorted(SOLVER_OPTIONS[solver_name]) or 'none'}")
    return _NFE_PER_STEP[solver_name] * (num_steps - 1) - int(bool(afs)) + int(bool(denoise_to_zero))


__all__ = [
    "ORDER_RANGE", "SCHEDULE_TYPES", "SOLVERS", "SOLVER_OPTIONS", "afs_slope", "dpm_2_sampler", "dpm_pp_sampler",
    "dynamic_threshold", "euler_sampler", "euler_step", "get_schedule", "heun_sampler", "ipndm_sampler",
    "nfe_of", "sample",
]

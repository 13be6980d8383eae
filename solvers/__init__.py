"""The solver library: schedules, one sampling loop, and a small step rule per solver (design §3-4).

TABLE is the one solver table: the SPEC of each solver (sampler, NFE per step, own options with their defaults,
order range) under the names of the paper's `--sampler_tea` option. SOLVERS is its sampler column, the callables
the teacher and sample.py run; nfe_of counts the network calls of a run.
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
from .spec import SolverSpec

TABLE = {module.SPEC.name: module.SPEC for module in (euler, heun, dpm_2, ipndm, dpm_solver_pp)}
SOLVERS = {name: spec.sampler for name, spec in TABLE.items()}


def spec_of(solver_name):
    """The table's SPEC of a solver; an unknown name is a one-line ValueError listing the known ones."""
    if solver_name not in TABLE:
        raise ValueError(f"unknown solver {solver_name!r}; choose one of {', '.join(TABLE)}")
    return TABLE[solver_name]


def nfe_of(solver_name, num_steps, afs=False, denoise_to_zero=False, **options):
    """Network calls made by the solver over num_steps time points (num_steps - 1 steps).

    AFS replaces the first call; denoise_to_zero adds one. Classifier-free guidance doubles each call inside the
    network and is not counted here.
    """
    spec = spec_of(solver_name)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    spec.check_options(options)
    return spec.nfe(num_steps, afs, denoise_to_zero)


__all__ = [
    "SCHEDULE_TYPES", "SOLVERS", "SolverSpec", "TABLE", "afs_slope", "dpm_2_sampler", "dpm_pp_sampler",
    "dynamic_threshold", "euler_sampler", "euler_step", "get_schedule", "heun_sampler", "ipndm_sampler", "nfe_of",
    "sample", "spec_of",
]

"""What the rest of the code knows about a solver, written once next to its step rule (design §4).

Each solver file ends with its `SPEC`: the sampler, the network calls per step, its own options with their
defaults, and the allowed max_order of the multistep ones. `solvers.TABLE` collects them by the names of the
paper's `--sampler_tea` option; the samplers take their option defaults from their SPEC, so what the table says is
what runs.
"""

import dataclasses
import numbers
import types
from typing import Callable, Mapping, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    name: str                                   # the --sampler_tea / --solver name
    sampler: Callable                           # sampler(net, latents, **sampling arguments, **options)
    nfe_per_step: int                           # network calls per step
    options: Mapping = dataclasses.field(default_factory=dict)  # the solver's own options and their defaults
    order_range: Optional[Tuple[int, int]] = None  # allowed max_order (multistep solvers)

    def __post_init__(self):
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))

    def split(self, kwargs):
        """(this solver's options with the defaults filled in, the other arguments) of a sampler call."""
        own = {k: kwargs[k] if k in kwargs else v for k, v in self.options.items()}
        if self.order_range is not None:
            own["max_order"] = self.check_max_order(own["max_order"])
        return own, {k: v for k, v in kwargs.items() if k not in self.options}

    def check_options(self, options):
        """Refuse option names this solver does not have (one line, naming the ones it has)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"solver {self.name!r} has no option(s) {', '.join(unknown)}; "
                             f"its options are {sorted(self.options) or 'none'}")

    def check_max_order(self, value, optional=False):
        """The one check of max_order (train.py, sample.py and the sampler itself call it): a plain int in this
        solver's order_range (None too with `optional`: the solver's default). Anything else is a one-line
        ValueError."""
        if value is None and optional:
            return None
        if self.order_range is None:
            raise ValueError(f"the {self.name} solver has no max_order")
        lo, hi = self.order_range
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
            raise ValueError(f"{self.sampler.__name__}: max_order must be an int in {lo}..{hi} for the {self.name} "
                             f"solver, got {value!r}")
        return int(value)

    def nfe(self, num_steps, afs=False, denoise_to_zero=False):
        """Network calls over num_steps time points (num_steps - 1 steps): AFS replaces the first call,
        denoise_to_zero adds one."""
        return self.nfe_per_step * (num_steps - 1) - int(bool(afs)) + int(bool(denoise_to_zero))

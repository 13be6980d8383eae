"""Heun's 2nd-order method, EDM's deterministic sampler (Karras et al. 2022, Algorithm 1). Two NFE per step.

The paper's code applies the correction on every step, the last one included (its schedules end at
sigma_min > 0, where EDM's "skip if t_next == 0" never fires); so do we, and t_steps must stay positive.
Under AFS only the first slope is analytical; the correction at t_1 still calls the network.
"""

from .sampling import sample
from .spec import SolverSpec


def heun_rule(step, history):
    h = step.t_next - step.t_cur
    x_pred = step.x + h * step.d                                         # Euler predictor (Alg. 1, l. 5)
    d_next = (x_pred - step.denoise(x_pred, step.t_next)) / step.t_next  # slope at the predicted point (l. 7)
    return step.x + h * (0.5 * step.d + 0.5 * d_next), None              # trapezoidal corrector (l. 8)


def heun_sampler(net, latents, **arguments):
    """Heun sampler; the arguments are those of `solvers.sampling.sample`."""
    return sample(heun_rule, net, latents, **arguments)


SPEC = SolverSpec("heun", heun_sampler, nfe_per_step=2)

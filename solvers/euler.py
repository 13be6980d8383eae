"""Euler, which is DDIM in the VE form (Song et al. 2021; Karras et al. 2022, §3). One NFE per step."""

from .sampling import Step, as_time, evaluate, make_denoiser, sample
from .spec import SolverSpec


def euler_rule(step, history):
    # x_{i+1} = x_i + (t_{i+1} - t_i)·d_i
    return step.x + (step.t_next - step.t_cur) * step.d, None


def euler_step(net, x, t_cur, t_next, class_labels=None, condition=None, unconditional_condition=None,
               step_condition=None, afs=False):
    """One differentiable Euler step of the network from (x, t_cur) to t_next (the SFD student step).

    With afs=True the slope is the analytical x / sqrt(1 + t_cur²) and the network is not called.
    """
    denoise = make_denoiser(net, class_labels, condition, unconditional_condition, step_condition)
    t_cur, t_next = as_time(t_cur, x), as_time(t_next, x)
    denoised, d = evaluate(denoise, x, t_cur, use_afs=afs)
    x_next, _ = euler_rule(Step(0, 2, x, t_cur, t_next, denoised, d, denoise), ())
    return x_next


def euler_sampler(net, latents, **arguments):
    """Euler (DDIM) sampler; the arguments are those of `solvers.sampling.sample`."""
    return sample(euler_rule, net, latents, **arguments)


SPEC = SolverSpec("euler", euler_sampler, nfe_per_step=1)

"""The one sampling loop every solver shares (design §2, §4).

A solver is a *step rule* `rule(step, history) -> (x_next, memo)`: it receives a `Step` (x at t_cur, the data
estimate and PF-ODE slope there, and a `denoise(x, t)` for any further network calls) and the memos it returned
on earlier steps (oldest first), and returns x at t_next plus what it wants to remember. The loop owns the
schedule, the analytical first step, the trajectory, denoise_to_zero and the history.
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence, Tuple

import torch

from .afs import afs_slope
from .schedules import get_schedule

# The deepest rule, 4th-order iPNDM, uses the three previous slopes.
HISTORY_LENGTH = 3


@dataclasses.dataclass(frozen=True)
class Step:
    """What a step rule knows when it takes step i from t_cur to t_next."""

    i: int                  # step index, 0 ... num_steps - 2
    num_steps: int          # N, the number of time points of the schedule
    x: torch.Tensor         # the sample at t_cur
    t_cur: torch.Tensor     # 0-dim
    t_next: torch.Tensor    # 0-dim
    denoised: torch.Tensor  # D(x, t_cur), or x - t_cur·d on an AFS step
    d: torch.Tensor         # PF-ODE slope dx/dt at t_cur
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # one more network call (one NFE)


StepRule = Callable[[Step, Sequence[Any]], Tuple[torch.Tensor, Any]]


def make_denoiser(net, class_labels=None, condition=None, unconditional_condition=None, step_condition=None):
    """Bind the conditions to the network: the result maps (x, sigma) to D(x, sigma)."""

    def denoise(x, sigma):
        return net(x, sigma, class_labels=class_labels, condition=condition,
                   unconditional_condition=unconditional_condition, step_condition=step_condition)

    return denoise


def time_dtype(x):
    """Noise levels are kept in float32, or float64 when the sample is float64."""
    return torch.promote_types(x.dtype, torch.float32)


def as_time(t, x):
    """A noise level as a 0-dim tensor on x's device (the form the networks receive)."""
    t = torch.as_tensor(t, dtype=time_dtype(x), device=x.device)
    if t.numel() != 1:
        raise ValueError(f"a noise level must be a single number, got a tensor of shape {tuple(t.shape)}")
    return t.reshape(())


def evaluate(denoise, x, t, use_afs):
    """(data estimate, PF-ODE slope) at (x, t); with AFS no network call is made."""
    if use_afs:
        d = afs_slope(x, t)
        return x - t * d, d
    denoised = denoise(x, t)
    return denoised, (x - denoised) / t  # dx/dt = (x - D(x, t)) / t, design §2


def resolve_schedule(net, latents, num_steps, sigma_min, sigma_max, schedule_type, schedule_rho, t_steps):
    """The time points to walk: `t_steps` if given, else `get_schedule(...)`; on latents' device."""
    if t_steps is None:
        if num_steps is None:
            raise ValueError("pass num_steps (the number of time points, >= 2) or an explicit t_steps")
        if schedule_type != "discrete":  # built once per setting: no device-to-host read in the sampling loop
            return _built_schedule(num_steps, float(sigma_min), float(sigma_max), schedule_type, float(schedule_rho),
                                   latents.device, time_dtype(latents))
        t_steps = get_schedule(num_steps, sigma_min, sigma_max, device=latents.device,
                               schedule_type=schedule_type, schedule_rho=schedule_rho, net=net)
    t_steps = torch.as_tensor(t_steps, dtype=time_dtype(latents), device=latents.device)
    if num_steps is not None and t_steps.dim() == 1 and num_steps != len(t_steps):
        raise ValueError(f"num_steps={num_steps} disagrees with len(t_steps)={len(t_steps)}; pass only one of them")
    return check_schedule(t_steps)


@functools.lru_cache(maxsize=64)
def _built_schedule(num_steps, sigma_min, sigma_max, schedule_type, schedule_rho, device, dtype):
    """A checked schedule tensor, shared by every call with the same settings (read-only: nothing writes to it)."""
    t_steps = get_schedule(num_steps, sigma_min, sigma_max, device=device, schedule_type=schedule_type,
                           schedule_rho=schedule_rho)
    return check_schedule(t_steps.to(dtype))


def check_schedule(t_steps):
    """t_steps itself after checking it is 1-D, at least 2 long, finite, positive and strictly decreasing."""
    if t_steps.dim() != 1 or len(t_steps) < 2:
        raise ValueError(f"t_steps must be a 1-D sequence of at least 2 noise levels, got shape {tuple(t_steps.shape)}")
    if not bool(torch.isfinite(t_steps).all() and (t_steps > 0).all() and (t_steps[1:] < t_steps[:-1]).all()):
        raise ValueError("t_steps must be finite, positive and strictly decreasing; end at sigma_min > 0 and use "
                         "denoise_to_zero=True for the final jump to sigma = 0")
    return t_steps


def sample(rule: StepRule, net, latents, class_labels=None, condition=None, unconditional_condition=None,
           num_steps=None, sigma_min=0.002, sigma_max=80, schedule_type="polynomial", schedule_rho=7, afs=False,
           denoise_to_zero=False, return_inters=False, step_condition=None, t_steps=None):
    """Integrate the PF-ODE from x = latents·t_0 down the schedule, one `rule` step per interval.

    Returns the final x, or with return_inters=True the trajectory stacked as
    [num_steps (+1 with denoise_to_zero), *latents.shape] whose entry i is x at t_i.
    """
    t_steps = resolve_schedule(net, latents, num_steps, sigma_min, sigma_max, schedule_type, schedule_rho, t_steps)
    denoise = make_denoiser(net, class_labels, condition, unconditional_condition, step_condition)
    n = len(t_steps)

    x = latents * t_steps[0]
    trajectory = [x]
    history = []
    for i in range(n - 1):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        denoised, d = evaluate(denoise, x, t_cur, use_afs=afs and i == 0)
        x, memo = rule(Step(i, n, x, t_cur, t_next, denoised, d, denoise), tuple(history))
        history = (history + [memo])[-HISTORY_LENGTH:]
        if return_inters:
            trajectory.append(x)

    if denoise_to_zero:
        x = denoise(x, t_steps[-1])
        if return_inters:
            trajectory.append(x)
    return torch.stack(trajectory) if return_inters else x


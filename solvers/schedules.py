"""Time discretisations t_0 = sigma_max > ... > t_{N-1} = sigma_min for the VE PF-ODE (design §3).

How time is discretised lives here; how one step is taken lives in the step-rule files.
"""

import math

import torch

# The schedule types, each with the tag an experiment folder gives it (as the paper's code names its folders).
SCHEDULE_TAGS = {"polynomial": "poly{rho}", "logsnr": "logsnr", "time_uniform": "uni{rho}", "discrete": "discrete{rho}"}
SCHEDULE_TYPES = tuple(SCHEDULE_TAGS)

# Smallest VP time of DPM-Solver's "time_uniform" schedule (Lu et al. 2022, §5).
VP_EPS_S = 1e-3


def get_schedule(num_steps, sigma_min, sigma_max, device=None, schedule_type="polynomial", schedule_rho=7, net=None):
    """Return a float32 1-D tensor of `num_steps` decreasing noise levels from sigma_max to sigma_min.

    schedule_type:
      'polynomial'   EDM (Karras et al. 2022, eq. 5): t^(1/rho) uniform.
      'logsnr'       log t uniform (DPM-Solver's choice for small images).
      'time_uniform' VP time t^(1/rho) uniform on [eps_s, 1], mapped to sigma through the VP sigma(t).
      'discrete'     LDM/SD: through the net's own sigma(t) / sigma_inv(sigma); needs `net`.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (N time points, N-1 steps), got {num_steps!r}")
    if schedule_type not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule_type {schedule_type!r}; choose one of {', '.join(SCHEDULE_TYPES)}")
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    rho = float(schedule_rho)
    if schedule_type != "logsnr" and not rho > 0:
        raise ValueError(f"schedule_rho must be > 0 for the {schedule_type!r} schedule, got {schedule_rho!r}")

    # Fraction of the way from the first to the last point; float64 so that float32 is the only rounding.
    frac = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    if schedule_type == "polynomial":
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        t_steps = (a + frac * (b - a)) ** rho
    elif schedule_type == "logsnr":
        t_steps = torch.exp(math.log(sigma_max) + frac * (math.log(sigma_min) - math.log(sigma_max)))
    elif schedule_type == "time_uniform":
        t_steps = _time_uniform(frac, sigma_min, sigma_max, rho)
    else:
        t_steps = _discrete(frac, sigma_min, sigma_max, rho, net, device)
    return t_steps.to(device=device, dtype=torch.float32)


def vp_coefficients(sigma_min, sigma_max, eps_s=VP_EPS_S):
    """beta_d, beta_min of the VP process whose sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
    equals sigma_max at t = 1 and sigma_min at t = eps_s (two linear equations in beta_d, beta_min)."""
    log_min, log_max = math.log1p(sigma_min ** 2), math.log1p(sigma_max ** 2)
    beta_d = 2 * (log_min / eps_s - log_max) / (eps_s - 1)
    beta_min = log_max - 0.5 * beta_d
    return beta_d, beta_min


def _time_uniform(frac, sigma_min, sigma_max, rho):
    # Evaluated in float64 with expm1/log1p. The paper's float32 exp(.) - 1 loses digits at small sigma (its last
    # point is 0.002013 for sigma_min = 0.002); ours ends at sigma_min as design §3 says.
    beta_d, beta_min = vp_coefficients(sigma_min, sigma_max)
    vp_t = (1 + frac * (VP_EPS_S ** (1 / rho) - 1)) ** rho
    return torch.sqrt(torch.expm1(0.5 * beta_d * vp_t ** 2 + beta_min * vp_t))


def _discrete(frac, sigma_min, sigma_max, rho, net, device):
    model = net
    if model is not None and not _has_discrete_time(model):
        model = getattr(model, "module", None)  # a DistributedDataParallel wrapper
    if model is None or not _has_discrete_time(model):
        raise ValueError(
            "schedule_type='discrete' needs a net on discrete time steps (the LDM and Stable Diffusion backbones); "
            "this one has none: use schedule type 'polynomial', 'logsnr' or 'time_uniform'"
        )
    # float64 throughout: t_min ** (1 / rho) and sigma(t) near t = 0 cancel digits (at rho = 1 float32 moves the
    # LDM end point 0.006 by 2e-4 relative).
    t_min = model.sigma_inv(torch.tensor(sigma_min, dtype=torch.float64, device=device)).reshape(-1)[0]
    t_max = model.sigma_inv(torch.tensor(sigma_max, dtype=torch.float64, device=device)).reshape(-1)[0]
    frac = frac.to(t_max.dtype)
    # design §3: t_min is raised to 1/rho but t_max is not, exactly as in the paper's code (t_max ~ 1, so the
    # numbers barely move; we keep them identical).
    tau = (t_max + frac * (t_min ** (1 / rho) - t_max)) ** rho
    return model.sigma(tau).reshape(-1)


def _has_discrete_time(obj):
    return callable(getattr(obj, "sigma", None)) and callable(getattr(obj, "sigma_inv", None))

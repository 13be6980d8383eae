"""Multistep DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++", §4-5) in the VE form α_t = 1, σ_t = t,
with λ = -log t. One NFE per step; orders 1-3 (design §4).

What we keep from the paper's code (facts, not its text):
- predict_x0=True (DPM-Solver++): the data estimates are remembered after dynamic thresholding.
  predict_x0=False: the paper's code then runs multistep DPM-Solver (noise prediction): it remembers the slope
  d = (x - D)/t, which in the VE form is the noise estimate ε, and does not threshold. We do the same.
- Order 2 is the "dpmsolver" variant (x - c·φ1·(m0 + ½·D1)); order 3 is DPM-Solver's multistep (φ1, φ2, φ3)
  update with D2 = (D1_0 - D1_1)/(r0 + r1). That D2 is half the second difference the φ3 term needs, so the
  "3rd-order" update is exact only for data estimates linear in λ and is globally 2nd-order accurate (with a
  smaller error than order 2). We keep the paper's coefficients because its teachers were run with them;
  tests/test_solvers.py pins both facts.
- Order schedule: i + 1 while warming up; with lower_order_final, min(max_order, N - (i + 1)) afterwards.
- Under AFS the remembered data estimate of step 0 is x - t_0·d with d the AFS slope (thresholded as usual).
"""

import functools
import math

import torch

from .sampling import sample
from .spec import SolverSpec

# Sampling thresholds the data predictions, as the paper's (fp32) sampling does; distillation sets its own default
# (training.config.DistillConfig.thresholding, off: the paper's fp16 teachers skipped it). Design §4.
SAMPLING_THRESHOLDING = True

# Imagen's dynamic thresholding percentile (Saharia et al. 2022, §2.3), as in the paper's code.
THRESHOLD_QUANTILE = 0.995


def dynamic_threshold(x0, quantile=THRESHOLD_QUANTILE):
    """Per sample: s = max(q, 1) with q the `quantile` of |x0| over all non-batch dims; x0 <- clamp(x0, -s, s)/s.

    The quantile is computed by sorting, so it also works where torch.quantile refuses (inputs over 2^24
    elements, half precision) -- in those cases the paper's code silently skips the thresholding; we apply it.
    """
    work = x0.to(torch.promote_types(x0.dtype, torch.float32))
    rows = work.abs().reshape(work.shape[0], -1).sort(dim=1).values
    position = quantile * (rows.shape[1] - 1)          # linear interpolation between order statistics
    lo = math.floor(position)
    hi = min(lo + 1, rows.shape[1] - 1)
    q = rows[:, lo] + (position - lo) * (rows[:, hi] - rows[:, lo])
    s = q.clamp(min=1).reshape(-1, *([1] * (work.dim() - 1)))
    return (torch.minimum(torch.maximum(work, -s), s) / s).to(x0.dtype)


def multistep_update(x, models, times, t_next, predict_x0):
    """x at t_next from x at times[0] and the remembered model outputs (newest first); order = len(models).

    Data prediction: x_t = (t/s)·x - Σ ...;  noise prediction: x_t = x - t·Σ ...  (VE forms of DPM-Solver++ eq. 9 /
    Alg. 2 and of DPM-Solver's multistep updates), written once with z = -h (data) or z = h (noise).
    """
    lam = [-torch.log(t) for t in times]
    h = -torch.log(t_next) - lam[0]
    scale, gain, z = (t_next / times[0], 1, -h) if predict_x0 else (1, t_next, h)
    phi1 = torch.expm1(z)
    if len(models) == 1:
        return scale * x - gain * phi1 * models[0]
    r0 = (lam[0] - lam[1]) / h
    d1_0 = (1 / r0) * (models[0] - models[1])           # divided difference in λ, scaled by the step h
    if len(models) == 2:
        return scale * x - gain * phi1 * (models[0] + 0.5 * d1_0)
    r1 = (lam[1] - lam[2]) / h
    d1_1 = (1 / r1) * (models[1] - models[2])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)        # first derivative, 2nd-order accurate
    d2 = (1 / (r0 + r1)) * (d1_0 - d1_1)                # second derivative
    phi2 = phi1 / z - 1
    phi3 = phi2 / z - 0.5
    return scale * x - gain * (phi1 * models[0] + phi2 * d1 + phi3 * d2)


def dpm_pp_order(i, num_steps, max_order, lower_order_final):
    """The order of step i of N time points (design §4)."""
    if lower_order_final:
        return i + 1 if i + 1 < max_order else min(max_order, num_steps - (i + 1))
    return min(max_order, i + 1)


def dpm_pp_rule(step, history, max_order, predict_x0, lower_order_final, thresholding):
    model = step.d
    if predict_x0:
        model = dynamic_threshold(step.denoised) if thresholding else step.denoised
    order = dpm_pp_order(step.i, step.num_steps, max_order, lower_order_final)
    past = tuple(reversed(history))[:order - 1]
    models = [model] + [m for m, _ in past]
    times = [step.t_cur] + [t for _, t in past]
    return multistep_update(step.x, models, times, step.t_next, predict_x0), (model, step.t_cur)


def dpm_pp_sampler(net, latents, **arguments):
    """Multistep DPM-Solver++ with the options of SPEC: max_order (1..3); predict_x0: data (True) or noise (False)
    prediction; lower_order_final: drop the order over the last steps; thresholding: pass each data prediction
    through dynamic thresholding, as the paper's code always does (turn it off for data that sits at ±1, e.g.
    black backgrounds, where it shrinks every value). Other arguments: `solvers.sampling.sample`."""
    options, arguments = SPEC.split(arguments)
    rule = functools.partial(dpm_pp_rule, max_order=options["max_order"], predict_x0=bool(options["predict_x0"]),
                             lower_order_final=bool(options["lower_order_final"]),
                             thresholding=bool(options["thresholding"]))
    return sample(rule, net, latents, **arguments)


SPEC = SolverSpec("dpmpp", dpm_pp_sampler, nfe_per_step=1, order_range=(1, 3), options=dict(
    max_order=3, predict_x0=True, lower_order_final=True, thresholding=SAMPLING_THRESHOLDING))

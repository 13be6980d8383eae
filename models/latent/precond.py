"""VP discrete preconditioning of LDM / Stable Diffusion U-Nets (design §6) and the denoisers SFD trains.

The U-Net predicts the noise eps of x_t = alpha_t y + sigma_t n at the discrete timestep. In the VE form used
everywhere else (x = y + sigma n, sigma = sigma_t / alpha_t):

    D(x, sigma) = x - sigma * eps(c_in x, c_noise),   c_in = 1 / sqrt(sigma^2 + 1),   c_noise = M sigma_inv(sigma) - 1

with sigma(t) from the model's own alphas_cumprod: log alpha is piecewise linear in t through the knots
t_k = k / M (k = 1..M), extended linearly beyond both ends (so sigma_min below sigma(1/M) gives a slightly
negative timestep, as in the paper's code). Classifier-free guidance: eps = eps_u + w (eps_c - eps_u), with the
two halves in one batch.

Only the U-Net (and the schedule buffer) is a registered part of these modules: the optimizer, DDP, snapshots
and `copy.deepcopy` see the U-Net alone. The frozen first stage and text encoder are loaded from the base
checkpoint named in `base` (on first use when a snapshot is rebuilt) and are shared, not copied, by deepcopy.
"""

import copy
import os

import torch

from ..edm import RecordedModule
from ..precond import per_sample
from ..snapshot import register_network_class
from .checkpoints import alphas_cumprod_of
from ..unet import LatentUNet


def _interp(x, xp, fp):
    """Piecewise-linear f(x) through (xp, fp), xp increasing; outside [xp_0, xp_-1] the end segments continue."""
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous()).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class _FrozenParts:
    """Frozen modules kept outside the registered module tree (never trained, saved, or deep-copied)."""

    def __init__(self):
        self.first_stage = None
        self.prompts = None
        self.captions = None
        self.caption_path = None  # None: the download (see loading.caption_file)
        self.uncond = {}

    def modules(self):
        found = [self.first_stage] if self.first_stage is not None else []
        return found + (self.prompts.modules() if self.prompts is not None else [])


@register_network_class
class LatentDiffusionPrecond(RecordedModule):
    """Unconditional latent diffusion (LDM on LSUN bedrooms / FFHQ) as an EDM-style denoiser."""

    guidance_type = "uncond"

    def __init__(self,
                 config,                    # the backbone's configuration (models/configs/*.yaml as a dict)
                 dataset_name=None,         # table row it came from (frozen parts are re-found through it)
                 sigma_min=None,            # sampling range; default sigma(1/M) .. sigma(1)
                 sigma_max=None,
                 use_step_condition=False,  # SFD-v step layers
                 use_fp16=False,            # autocast the U-Net to float16 on CUDA
                 guidance_rate=1.0,         # classifier-free guidance weight (text models)
                 base=None,                 # where the frozen parts come from: checkpoint paths, cache_root
                 ):
        super().__init__()
        latent = config["latent"]
        self.config = config
        self.dataset_name = dataset_name
        self.img_resolution = latent["resolution"]
        self.img_channels = latent["channels"]
        self.scale_factor = float(latent.get("scale_factor", 1.0))
        self.label_dim = 0
        self.use_step_condition = use_step_condition
        self.use_fp16 = use_fp16
        self.guidance_rate = guidance_rate
        self.base = dict(base or {})
        self.register_buffer("alphas_cumprod", alphas_cumprod_of(config["schedule"]))
        self.M = len(self.alphas_cumprod)
        self.sigma_min = float(sigma_min) if sigma_min is not None else float(self.sigma(1.0 / self.M))
        self.sigma_max = float(sigma_max) if sigma_max is not None else float(self.sigma(1.0))
        self.model = torch.nn.Module()  # so that state_dict keys read model.diffusion_model.* as in CompVis files
        self.model.diffusion_model = LatentUNet(**config["unet"], use_step_condition=use_step_condition)
        self._frozen = _FrozenParts()

    # -- time <-> noise level (design §3 'discrete', §6) ------------------------------------------------

    def _knots(self, device):
        log_alpha = 0.5 * self.alphas_cumprod.to(device=device, dtype=torch.float64).log()
        t = torch.arange(1, self.M + 1, dtype=torch.float64, device=device) / self.M
        return t, log_alpha

    def sigma(self, t):
        """sigma(t) = sqrt(1/alpha(t)^2 - 1) for VP time t in (0, 1]."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        knots, log_alpha = self._knots(t.device)
        la = _interp(t.to(torch.float64), knots, log_alpha)
        return torch.expm1(-2 * la).sqrt().to(t.dtype if t.is_floating_point() else torch.float32)

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma, device=self.alphas_cumprod.device)
        knots, log_alpha = self._knots(sigma.device)
        la = -0.5 * torch.log1p(sigma.to(torch.float64) ** 2)
        t = _interp(la, log_alpha.flip(0), knots.flip(0))
        return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    # -- the denoiser -----------------------------------------------------------------------------

    def forward(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None,
                step_condition=None, augment_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma = per_sample(sigma, batch, x.device, "sigma")
        c_in = (1 / (sigma ** 2 + 1).sqrt()).reshape(-1, 1, 1, 1)
        c_noise = self.M * self.sigma_inv(sigma) - 1  # the (fractional) discrete timestep
        if self.use_step_condition:
            if step_condition is None:
                raise ValueError("this network was built with use_step_condition=True: pass step_condition=num_steps")
            step_condition = per_sample(step_condition, batch, x.device, "step_condition")
        else:
            step_condition = None
        autocast = bool(self.use_fp16 and not force_fp32 and x.device.type == "cuda")
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            eps = self._eps(c_in * x, c_noise, condition, unconditional_condition, step_condition)
        return x - sigma.reshape(-1, 1, 1, 1) * eps.to(torch.float32)

    def _unet(self, x, t, context, step_condition):
        return self.model.diffusion_model(x, t, context=context, step_condition=step_condition)

    def _eps(self, x, t, condition, unconditional_condition, step_condition):
        return self._unet(x, t, None, step_condition)

    def ignore_step_condition(self):
        """Run as the pre-trained network: the step layers stay but are skipped (SFD-v's first-stage teacher)."""
        self.use_step_condition = False
        self.model.diffusion_model.use_step_condition = False
        return self

    # -- the frozen first stage -------------------------------------------------------------------

    def attach_frozen(self, first_stage=None, prompts=None):
        """Install already-loaded frozen parts (the loader does this; snapshots load them on first use)."""
        if first_stage is not None:
            self._frozen.first_stage = first_stage.eval().requires_grad_(False)
        if prompts is not None:
            self._frozen.prompts = prompts
        for module in self._frozen.modules():
            module.to(self.alphas_cumprod.device)
        return self

    def _first_stage(self):
        if self._frozen.first_stage is None:
            from .loading import load_first_stage

            self.attach_frozen(first_stage=load_first_stage(self.config, self.base, self.dataset_name))
        return self._frozen.first_stage

    @torch.no_grad()
    def decode_latents(self, x, chunk=8):
        """Sampled latents -> images in [-1, 1] through the frozen first stage (in float32, `chunk` at a time)."""
        from .first_stage import decode

        first_stage = self._first_stage()
        z = x.to(torch.float32) / self.scale_factor
        return torch.cat([decode(first_stage, part) for part in z.split(chunk)]).clamp(-1, 1)

    # -- module plumbing --------------------------------------------------------------------------

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for module in self._frozen.modules():
            module._apply(fn, *args, **kwargs)
        return self

    def __deepcopy__(self, memo):
        memo[id(self._frozen)] = self._frozen  # the teacher copy shares the frozen parts
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone


@register_network_class
class TextToImagePrecond(LatentDiffusionPrecond):
    """Stable Diffusion: text-conditioned U-Net with classifier-free guidance."""

    guidance_type = "cfg"

    def _eps(self, x, t, condition, unconditional_condition, step_condition):
        if condition is None:
            raise ValueError("Stable Diffusion is text-conditioned: pass condition= (see encode_prompts)")
        condition = condition.to(x.device).expand(x.shape[0], -1, -1)
        if self.guidance_rate == 1 or unconditional_condition is None:
            return self._unet(x, t, condition, step_condition)
        uncond = unconditional_condition.to(x.device).expand(x.shape[0], -1, -1)
        steps = None if step_condition is None else torch.cat([step_condition] * 2)
        eps_u, eps_c = self._unet(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uncond, condition]),
                                  steps).chunk(2)
        return eps_u + self.guidance_rate * (eps_c - eps_u)

    def _prompts(self):
        if self._frozen.prompts is None:
            from .loading import load_prompt_encoder

            self.attach_frozen(prompts=load_prompt_encoder(self.config, self.base, self.dataset_name))
        return self._frozen.prompts

    def _empty_prompt(self, device):
        key = str(device)
        if key not in self._frozen.uncond:
            self._frozen.uncond[key] = self._prompts()([""]).to(device)
        return self._frozen.uncond[key]

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """(condition, unconditional_condition) for a list of prompts; the latter only when guidance needs it."""
        condition = self._prompts()(prompts)
        uncond = None
        if self.guidance_rate != 1:
            uncond = self._empty_prompt(condition.device).expand(len(prompts), -1, -1)
        return condition, uncond

    def use_caption_file(self, path):
        """Read the captions from this CSV (a command's --captions) instead of the MS-COCO download."""
        self._frozen.caption_path = os.path.abspath(path) if path else None
        self._frozen.captions = None

    def _captions(self):
        if self._frozen.captions is None:
            from .loading import caption_file
            from .text import read_captions

            self._frozen.captions = read_captions(caption_file(self.base, self.dataset_name, self._frozen.caption_path))
        return self._frozen.captions

    @torch.no_grad()
    def draw_conditions(self, batch, device):
        """Training conditions: `batch` distinct random MS-COCO captions (torch's global RNG), encoded."""
        captions = self._captions()
        if batch > len(captions):
            raise ValueError(f"cannot draw {batch} distinct captions from {len(captions)}")
        picks = torch.randperm(len(captions))[:batch].tolist()
        condition, uncond = self.encode_prompts([captions[i] for i in picks])
        return condition.to(device), None if uncond is None else uncond.to(device)

    def captions_for_seeds(self, seeds):
        """The caption of row `seed` of the caption CSV for every seed (design §7)."""
        captions = self._captions()
        bad = [s for s in seeds if not 0 <= s < len(captions)]
        if bad:
            raise ValueError(f"seed {bad[0]} has no caption (the caption file has {len(captions)} rows): "
                             f"use seeds 0-{len(captions) - 1} or --prompt")
        return [captions[s] for s in seeds]

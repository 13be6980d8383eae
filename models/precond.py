"""Preconditioning wrappers that turn a U-Net F into a denoiser D(x, sigma) (EDM paper, Table 1).

All of them share one call signature (design §2):

    net(x, sigma, class_labels=None, condition=None, unconditional_condition=None,
        step_condition=None, augment_labels=None, force_fp32=False) -> D(x), float32

D(x) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).
`condition`/`unconditional_condition` are the text-conditioning inputs of latent backbones; EDM-family
networks accept and ignore them. `step_condition` is SFD-v's step number (design §5), one number broadcast
over the batch. A VP-discrete wrapper for LDM / Stable Diffusion lives beside these in its own module
and registers itself in `models.snapshot.NETWORK_CLASSES`.
"""

import numbers

import numpy as np
import torch

from . import edm
from .edm import RecordedModule
from .unet import OpenAIUNet

# model_type (as recorded in EDM checkpoints and our snapshots) -> U-Net class.
UNET_CLASSES = {**edm.UNET_CLASSES, "OpenAIUNet": OpenAIUNet}


def per_sample(value, batch, device, option):
    """A python number, a 0-dim tensor or a [B] tensor as a float32 [B] tensor."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.full([batch], float(value), dtype=torch.float32, device=device)  # a fill: no host-to-device copy
    value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if value.numel() == 1:
        return value.expand(batch)
    if value.numel() != batch:
        raise ValueError(f"{option} has {value.numel()} values for a batch of {batch}: pass one number or one per sample")
    return value


class _Precond(RecordedModule):
    """What EDM's four preconditioners share; a subclass supplies `_coefficients(sigma)`."""

    model_out_factor = 1  # iDDPM's U-Net also predicts a variance channel block, which D(x) discards.

    def _build_model(self, img_resolution, img_channels, label_dim, use_fp16, model_type, use_step_condition, model_kwargs):
        if model_type not in UNET_CLASSES:
            raise ValueError(f"model_type={model_type!r} is not supported: use one of {', '.join(UNET_CLASSES)}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_step_condition = use_step_condition
        self.model = UNET_CLASSES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                              out_channels=img_channels * self.model_out_factor, label_dim=label_dim,
                                              use_step_condition=use_step_condition, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None,
                step_condition=None, augment_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma = per_sample(sigma, batch, x.device, "sigma").reshape(-1, 1, 1, 1)
        if self.label_dim:
            class_labels = (torch.zeros([1, self.label_dim], device=x.device) if class_labels is None
                            else class_labels.to(torch.float32).reshape(-1, self.label_dim))
        else:
            class_labels = None
        if self.use_step_condition:
            if step_condition is None:
                raise ValueError("this network was built with use_step_condition=True: pass step_condition=num_steps")
            step_condition = per_sample(step_condition, batch, x.device, "step_condition")
        else:
            step_condition = None  # a plain network has no step layers to feed
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32

        c_skip, c_out, c_in, c_noise = self._coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                         augment_labels=augment_labels, step_condition=step_condition)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def ignore_step_condition(self):
        """Run as the plain pre-trained network: the step layers stay but are skipped (SFD-v's first-stage
        teacher is the network without its step embedding, as in the paper's code)."""
        self.use_step_condition = False
        self.model.use_step_condition = False
        return self


class EDMPrecond(_Precond):
    """EDM preconditioning (design §6): c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""

    def __init__(self,
                 img_resolution,              # Image resolution.
                 img_channels,                # Number of color channels.
                 label_dim=0,                 # Number of class labels, 0 = unconditional.
                 use_fp16=False,              # Run the U-Net in fp16 (CUDA only).
                 sigma_min=0.002,             # Lowest noise level sampling should use.
                 sigma_max=80.0,              # Highest noise level sampling should use.
                 sigma_data=0.5,              # Expected standard deviation of the training data.
                 model_type="DhariwalUNet",   # Class name of the U-Net.
                 use_step_condition=False,    # SFD-v: add the step-condition layers.
                 **model_kwargs,              # Keyword arguments of the U-Net.
                 ):
        super().__init__()
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self._build_model(img_resolution, img_channels, label_dim, use_fp16, model_type, use_step_condition, model_kwargs)

    def _coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
    """EDM's continuous variance-preserving preconditioning (Song et al. 2021 VP SDE, EDM Table 1)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", use_step_condition=False, **model_kwargs):
        super().__init__()
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1))
        self._build_model(img_resolution, img_channels, label_dim, use_fp16, model_type, use_step_condition, model_kwargs)

    def _coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t):
        """VP SDE: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        exponent = 0.5 * self.beta_d * (t ** 2) + self.beta_min * t
        return (exponent.exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """The t of a given sigma: the positive root of beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)."""
        log_var = (1 + torch.as_tensor(sigma) ** 2).log()
        return ((self.beta_min ** 2 + 2 * self.beta_d * log_var).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """EDM's variance-exploding preconditioning (Song et al. 2021 VE SDE, EDM Table 1)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", use_step_condition=False, **model_kwargs):
        super().__init__()
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._build_model(img_resolution, img_channels, label_dim, use_fp16, model_type, use_step_condition, model_kwargs)

    def _coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(_Precond):
    """EDM's improved-DDPM preconditioning: sigma is snapped to the M discrete levels `u` (EDM Table 1)."""

    model_out_factor = 2

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type="DhariwalUNet", use_step_condition=False, **model_kwargs):
        super().__init__()
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self._build_model(img_resolution, img_channels, label_dim, use_fp16, model_type, use_step_condition, model_kwargs)
        # u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar_{j-1} / alpha_bar_j, C_1) - 1), u_M = 0, in float32
        # like EDM; numpy scalars because 1000 steps of 0-dim torch ops are slow.
        alpha_bar = self.alpha_bar(torch.arange(M + 1)).numpy()
        c_1 = np.float32(C_1)
        u = np.zeros(M + 1, dtype=np.float32)
        for j in range(M, 0, -1):
            u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], c_1) - 1)
        self.register_buffer("u", torch.from_numpy(u))
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def _coefficients(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise

    def alpha_bar(self, j):
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        flat = sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1)
        index = torch.cdist(flat, self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


# Class names found in EDM checkpoints -> our classes.
EDM_PRECOND_CLASSES = {cls.__name__: cls for cls in (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond)}

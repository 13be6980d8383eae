"""Any diffusers pipeline folder as a teacher (loader family 'diffusers', design §6).

    load_network(model_path=DIR)                      DIR holds model_index.json, unet/, scheduler/ (+ vae/,
    load_network('diffusers', model_path=DIR)         text_encoder/, tokenizer/ for text-to-image)

Covered: pixel-space UNet2DModel pipelines (DDPM / DDIM, optionally class-conditional through num_class_embeds) and
UNet2DConditionModel text-to-image pipelines of the Stable Diffusion 1.x / 2.x families (CLIP text encoder, KL
autoencoder), with prediction_type epsilon, v_prediction or sample. The U-Net is diffusers' own class built from the
folder's config.json, its weights copied in strictly (every key and shape). The noise schedule is the scheduler
config's betas as diffusers computes them (linear, scaled_linear, squaredcos_cap_v2 or trained_betas), so
alphas_cumprod is bit for bit diffusers'. Denoiser, in the VE form x = y + sigma n:

    x_in = x / sqrt(sigma^2 + 1),  t = diffusers' timestep of sigma (log sigma linear between integer timesteps,
    clamped to 0 .. T-1, as EulerDiscreteScheduler._sigma_to_t),  F = U-Net(x_in, t)
    epsilon: D = x - sigma F;  v_prediction: D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) F;  sample: D = F

The sigma range is the scheduler's own: sigma(t = 0) .. sigma(t = T-1). SFD-v (use_step_condition) rebuilds the U-Net
from its config with diffusers' own class_embed_type="timestep": a fresh TimestepEmbedding (default init) embeds the
student's num_steps through the U-Net's time projection, added to the time embedding, and the U-Net is called with
class_labels = num_steps; the pre-trained weights load strictly into everything else. The teacher drops that
embedding (ignore_step_condition), so it is the pre-trained U-Net exactly. Class-conditional U-Nets (their class
embedding is taken) refuse SFD-v. The frozen autoencoder and text encoder are read with diffusers / transformers from the
pipeline folder, which a snapshot names (`pipeline` in its init_kwargs). SDXL and other multi-encoder or
added-condition pipelines are refused in one line.
"""

import os

import torch

from .edm import RecordedModule
from .latent.checkpoints import read_diffusers_weights, read_json, take_strict
from .latent.precond import LatentDiffusionPrecond, TextToImagePrecond, _FrozenParts, _interp
from .precond import per_sample
from .snapshot import register_network_class

DATASET_NAME = "diffusers"  # --dataset_name of every pipeline folder (optional with --model_path=DIR)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Schedulers whose config is a VP-discrete DDPM schedule (betas over num_train_timesteps), which is all we read.
SCHEDULER_CLASSES = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def alphas_cumprod_from(schedule):
    """alphas_cumprod exactly as diffusers' schedulers compute it from their config (float32)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**schedule).alphas_cumprod.clone()


def _component(folder, part, why):
    """(path, config dict, _class_name) of one component's config file, refused in one line when absent."""
    path = os.path.join(folder, part)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {part}; {why}")
    config = read_json(path)
    return path, config, config.get("_class_name")


def read_scheduler(folder):
    """(schedule keywords, prediction_type) of a pipeline's scheduler config, or a one-line ValueError."""
    path, config, name = _component(folder, "scheduler/scheduler_config.json", "a diffusers pipeline folder needs one")
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"{path}: scheduler {name!r} cannot be mapped to a VP-discrete schedule; supported: "
                         f"{', '.join(SCHEDULER_CLASSES)} (edit _class_name if its betas are a DDPM schedule)")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{path}: unknown prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ValueError(f"{path}: beta_schedule {config.get('beta_schedule')!r} cannot be mapped; supported: "
                         f"{', '.join(BETA_SCHEDULES)} or trained_betas")
    for key, bad, why in (("rescale_betas_zero_snr", True, "a zero terminal SNR has an infinite sigma_max"),
                          ("timestep_type", "continuous", "continuous timesteps are not a discrete schedule"),
                          ("use_flow_sigmas", True, "flow matching is not a VP schedule")):
        if config.get(key) == bad:
            raise ValueError(f"{path}: {key}={bad!r} cannot be mapped ({why})")
    schedule = {k: config[k] for k in SCHEDULE_KEYS if k in config}
    return schedule, prediction_type


def read_unet_config(folder):
    path, config, name = _component(folder, "unet/config.json", "SFD distils the pipeline's U-Net")
    if name not in UNET_CLASSES:
        raise ValueError(f"{path}: a {name!r} denoiser; supported: {', '.join(UNET_CLASSES)} (DDPM/DDIM, SD 1.x/2.x)")
    return name, {k: v for k, v in config.items() if not k.startswith("_")}


def _check_supported(folder, unet_class, unet_config):
    index = read_json(os.path.join(folder, "model_index.json"))
    if "text_encoder_2" in index or unet_config.get("addition_embed_type") or "XL" in str(index.get("_class_name")):
        raise ValueError(f"{folder}: SDXL-style pipelines (two text encoders, added conditions) are not supported; "
                         "use an SD 1.x/2.x or DDPM/DDIM pipeline")
    if unet_config.get("in_channels", 4) != unet_config.get("out_channels", 4):
        raise ValueError(f"{folder}: the U-Net takes {unet_config.get('in_channels')} channels and returns "
                         f"{unet_config.get('out_channels')} (inpainting/upscaling); only plain generation is supported")
    if unet_config.get("class_embed_type") is not None or unet_config.get("time_cond_proj_dim") is not None:
        raise ValueError(f"{folder}: the U-Net takes extra conditions (class_embed_type / time_cond_proj_dim); "
                         "only class labels (num_class_embeds) and text are supported")
    if unet_class == "UNet2DConditionModel":
        missing = [p for p in ("vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(folder, p))]
        if missing:
            raise ValueError(f"{folder}: a text-to-image pipeline needs {', '.join(missing)}/ beside unet/")
        if unet_config.get("num_class_embeds"):
            raise ValueError(f"{folder}: a text-to-image U-Net with class embeddings is not supported")


STEP_EMBEDDING = "class_embedding"  # SFD-v's step embedding: diffusers' class_embed_type="timestep" (module docstring)


def build_unet(unet_class, unet_config, use_step_condition=False):
    import diffusers

    if use_step_condition:
        unet_config = dict(unet_config, class_embed_type="timestep")
    return getattr(diffusers, unet_class).from_config(unet_config)


def _check_step_condition(folder, unet_config):
    """SFD-v needs the U-Net's class embedding free and a time projection that takes real numbers."""
    why = None
    if unet_config.get("num_class_embeds"):
        why = "its U-Net is class-conditional (num_class_embeds), and the step condition enters as the class embedding"
    elif unet_config.get("time_embedding_type") == "learned":
        why = "its U-Net's learned time embedding takes integer timesteps only"
    elif unet_config.get("class_embeddings_concat"):
        why = "its U-Net concatenates class embeddings (class_embeddings_concat)"
    if why:
        raise ValueError(f"--use_step_condition (SFD-v) is not available for {folder}: {why}; distil SFD with "
                         "--use_step_condition=False")


def build_pipeline(folder, use_step_condition=False):
    """(net, settings) for a diffusers pipeline folder; every refusal is one ValueError line."""
    folder = os.path.abspath(folder)
    unet_class, unet_config = read_unet_config(folder)
    _check_supported(folder, unet_class, unet_config)
    use_step_condition = bool(use_step_condition)
    if use_step_condition:
        _check_step_condition(folder, unet_config)
    schedule, prediction_type = read_scheduler(folder)
    kwargs = dict(pipeline=folder, unet_class=unet_class, unet_config=unet_config, schedule=schedule,
                  prediction_type=prediction_type, use_step_condition=use_step_condition)
    if unet_class == "UNet2DConditionModel":
        vae = read_json(os.path.join(folder, "vae", "config.json"))
        kwargs.update(scaling_factor=float(vae.get("scaling_factor", 0.18215)), guidance_rate=1.0)
        cls = DiffusersTextToImagePrecond
    else:
        cls = DiffusersPrecond
    with torch.random.fork_rng(devices=[]):
        try:
            net = cls(**kwargs)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{folder}/unet/config.json cannot build {unet_class}: {' '.join(str(e).split())}") from None
    found, source = read_diffusers_weights(os.path.join(folder, "unet"))
    copy_unet(net.unet, found, source, fresh=(STEP_EMBEDDING + ".",) if use_step_condition else ())
    settings = dict(dataset_name=DATASET_NAME, model_source="diffusers", model_path=folder, sigma_min=net.sigma_min,
                    sigma_max=net.sigma_max, use_step_condition=use_step_condition, guidance_type=net.guidance_type)
    return net, settings


def copy_unet(unet, found, source, fresh=()):
    """Strict copy of diffusers-named U-Net tensors (every key, every shape) but those under the `fresh` prefixes
    (SFD-v's new step embedding), which keep their initialisation."""
    own = unet.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items() if not k.startswith(tuple(fresh))}
    taken = take_strict(expected, found, source, "U-Net")
    with torch.no_grad():
        for key, value in taken.items():
            own[key].copy_(value)


class _DiffusersDenoiser:
    """The VP-discrete denoiser over a diffusers U-Net (module docstring); shared by the pixel and text classes."""

    def _setup(self, pipeline, unet_class, unet_config, schedule, prediction_type, use_fp16, use_step_condition):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.pipeline, self.unet_class, self.prediction_type = pipeline, unet_class, prediction_type
        self.use_fp16, self.use_step_condition = use_fp16, bool(use_step_condition)
        self.unet = build_unet(unet_class, unet_config, self.use_step_condition)
        self.img_resolution = int(unet_config["sample_size"] if isinstance(unet_config.get("sample_size"), int)
                                  else unet_config["sample_size"][0])
        self.img_channels = int(unet_config["in_channels"])
        self.register_buffer("alphas_cumprod", alphas_cumprod_from(schedule))
        self.M = len(self.alphas_cumprod)
        self.sigma_min = float(self._sigmas()[0])
        self.sigma_max = float(self._sigmas()[-1])

    def _sigmas(self, device=None):
        """sigma of every integer timestep, computed as diffusers does (float32), returned in float64."""
        ac = self.alphas_cumprod.to(device) if device is not None else self.alphas_cumprod
        return (((1 - ac) / ac) ** 0.5).double()

    def timestep(self, sigma):
        """diffusers' (fractional) timestep of sigma: log sigma interpolated linearly, clamped to 0 .. T-1."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self._sigmas(sigma.device).float().log().double()
        steps = torch.arange(self.M, dtype=torch.float64, device=sigma.device)
        log_sigma = sigma.double().clamp_min(1e-10).log().clamp(log_sigmas[0], log_sigmas[-1])
        return _interp(log_sigma, log_sigmas, steps)

    # design §3 'discrete': VP time t in (0, 1] is (timestep + 1) / T.
    def sigma(self, t):
        t = torch.as_tensor(t)
        steps = torch.arange(self.M, dtype=torch.float64, device=t.device)
        log_sigmas = self._sigmas(t.device).log()
        step = (t.double() * self.M - 1).clamp(0, self.M - 1)
        return _interp(step, steps, log_sigmas).exp().to(t.dtype if t.is_floating_point() else torch.float32)

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        t = (self.timestep(sigma) + 1) / self.M
        return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    round_sigma = LatentDiffusionPrecond.round_sigma

    def forward(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None,
                step_condition=None, augment_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = per_sample(sigma, x.shape[0], x.device, "sigma")
        s = sigma.reshape(-1, 1, 1, 1)
        c_in = 1 / (s ** 2 + 1).sqrt()
        t = self.timestep(sigma).to(torch.float32)
        if self.use_step_condition:
            if step_condition is None:
                raise ValueError("this network was built with use_step_condition=True: pass step_condition=num_steps")
            step_condition = per_sample(step_condition, x.shape[0], x.device, "step_condition").to(torch.float32)
        else:
            step_condition = None
        autocast = bool(self.use_fp16 and not force_fp32 and x.device.type == "cuda")
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            out = self._model_output(c_in * x, t, class_labels, condition, unconditional_condition,
                                     step_condition).to(torch.float32)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (s ** 2 + 1) - s * c_in * out
        return out

    def ignore_step_condition(self):
        """Run as the pre-trained U-Net: SFD-v's step embedding is dropped (diffusers then adds no class embedding),
        so the first-stage teacher is exactly the pipeline's network."""
        if self.use_step_condition:
            self.use_step_condition = False
            setattr(self.unet, STEP_EMBEDDING, None)
        return self


@register_network_class
class DiffusersPrecond(_DiffusersDenoiser, RecordedModule):
    """A pixel-space diffusers U-Net (UNet2DModel: DDPM / DDIM pipelines) as an EDM-style denoiser."""

    guidance_type = None

    def __init__(self,
                 pipeline,                  # the pipeline folder it was read from
                 unet_class,                # 'UNet2DModel'
                 unet_config,               # the folder's unet/config.json (without '_' keys)
                 schedule,                  # the scheduler config's betas (SCHEDULE_KEYS)
                 prediction_type="epsilon",
                 use_fp16=False,
                 use_step_condition=False,  # SFD-v: a step embedding (class_embed_type="timestep")
                 ):
        super().__init__()
        self._setup(pipeline, unet_class, unet_config, schedule, prediction_type, use_fp16, use_step_condition)
        embeds = unet_config.get("num_class_embeds")
        self.label_dim = int(embeds or 0)

    def _model_output(self, x, t, class_labels, condition, unconditional_condition, step_condition):
        labels = step_condition  # SFD-v's step embedding is the U-Net's class embedding (never with label_dim)
        if self.label_dim:
            if class_labels is None:
                raise ValueError("this pipeline's U-Net is class-conditional: pass class_labels")
            labels = class_labels.reshape(x.shape[0], -1).argmax(dim=1)
        return self.unet(x, t, class_labels=labels).sample


@register_network_class
class DiffusersTextToImagePrecond(_DiffusersDenoiser, TextToImagePrecond):
    """A Stable Diffusion 1.x / 2.x pipeline (UNet2DConditionModel, CLIP text encoder, KL autoencoder); guidance,
    prompts, captions and decoding as ms_coco's (models/latent/precond.py)."""

    needs_caption_file = True  # training prompts come from --captions (there is no download to fall back on)

    def __init__(self,
                 pipeline,
                 unet_class,                # 'UNet2DConditionModel'
                 unet_config,
                 schedule,
                 prediction_type="epsilon",
                 scaling_factor=0.18215,    # the autoencoder's latent scale (vae/config.json)
                 guidance_rate=1.0,
                 use_fp16=False,
                 use_step_condition=False,
                 ):
        torch.nn.Module.__init__(self)
        self._setup(pipeline, unet_class, unet_config, schedule, prediction_type, use_fp16, use_step_condition)
        self.scale_factor = float(scaling_factor)
        self.guidance_rate = guidance_rate
        self.label_dim = 0
        self.dataset_name = DATASET_NAME
        self.base = {}
        self._frozen = _FrozenParts()

    def _model_output(self, x, t, class_labels, condition, unconditional_condition, step_condition):
        return self._eps(x, t, condition, unconditional_condition, step_condition)

    def _unet(self, x, t, context, step_condition):
        return self.unet(x, t, encoder_hidden_states=context, class_labels=step_condition).sample

    def _first_stage(self):
        if self._frozen.first_stage is None:
            from diffusers import AutoencoderKL

            self.attach_frozen(first_stage=AutoencoderKL.from_pretrained(os.path.join(self.pipeline, "vae")))
        return self._frozen.first_stage

    def _prompts(self):
        if self._frozen.prompts is None:
            from transformers import CLIPTextModel

            from .latent.text import PromptEncoder

            encoder = CLIPTextModel.from_pretrained(os.path.join(self.pipeline, "text_encoder"), local_files_only=True)
            self.attach_frozen(prompts=PromptEncoder(encoder, os.path.join(self.pipeline, "tokenizer"),
                                                     encoder.config.max_position_embeddings))
        return self._frozen.prompts

    def _captions(self):
        if self._frozen.captions is None:
            if not self._frozen.caption_path:
                raise ValueError("a diffusers text-to-image pipeline has no caption file of its own: give --captions=CSV "
                                 "(a 'text' column; row = seed)")
            from .latent.text import read_captions

            self._frozen.captions = read_captions(self._frozen.caption_path)
        return self._frozen.captions

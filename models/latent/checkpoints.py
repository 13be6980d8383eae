"""Reading latent-diffusion checkpoints in the layouts they are published in, and strict name matching.

Layouts:
  CompVis single file (`model.ckpt` of the LDM zips, SD's `v1-5-pruned-emaonly.ckpt` / `.safetensors`):
      one state dict with `model.diffusion_model.*` (U-Net), `first_stage_model.*` (autoencoder),
      `cond_stage_model.transformer.*` (SD's CLIP text encoder), 12 DDPM schedule buffers and, for configs
      with use_ema, `model_ema.*` shadows whose names are the U-Net's with the dots removed.
  diffusers folder (SD): `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` sub-folders.

`.ckpt` files are read with `torch.load(weights_only=True)`. PyTorch-Lightning checkpoints may also pickle
training objects (hyper-parameters, callbacks) that this refuses; then a restricted unpickler reads the file
instead: it resolves only tensor-rebuilding functions and turns every other global into an inert placeholder,
so no code from the file runs. Only the tensors are used.
"""

import json
import os
import pickle
import re
import zipfile

import torch

from torch_utils.restricted_pickle import as_pickle_module

# The DDPM tables LatentDiffusion registers as buffers (every CompVis checkpoint carries them).
def alphas_cumprod_of(schedule):
    """CompVis' 'linear' DDPM schedule: betas = linspace(sqrt(start), sqrt(end), T)^2, in float64, stored float32."""
    if schedule.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"only CompVis' 'linear' beta schedule is supported, got {schedule.get('beta_schedule')!r}")
    betas = torch.linspace(schedule["linear_start"] ** 0.5, schedule["linear_end"] ** 0.5, schedule["timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
# Saved by some LatentDiffusion versions but unused for sampling and distillation (a learned-logvar table).
IGNORABLE = ("logvar",)
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."


# ----------------------------------------------------------------------------
# Reading files.


# Legacy (non-zip) checkpoints pickle whatever their training code held (Lightning callbacks, configs): every
# class besides tensors is read as an inert record.
_LEGACY_PICKLE = as_pickle_module(inert=lambda name: True)


def sniff(path):
    """'safetensors', 'torch' (zip or legacy pickle), 'diffusers' (a folder) or None."""
    if os.path.isdir(path):
        is_pipeline = os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isdir(os.path.join(path, "unet"))
        return "diffusers" if is_pipeline else None
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    return None


def read_state_dict(path):
    """name -> tensor from a .ckpt/.pt/.bin (torch) or .safetensors file; a Lightning 'state_dict' is unwrapped."""
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(f"{path} is a damaged safetensors file: {type(e).__name__}: {e}") from None
    if kind != "torch":
        raise ValueError(f"{path} is neither a torch checkpoint (.ckpt/.pt/.bin) nor a .safetensors file")
    with open(path, "rb") as f:
        mmap = f.read(2) == b"PK"  # zip-format files are memory-mapped: a 4 GB SD file is not copied into RAM twice
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        try:
            data = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LEGACY_PICKLE, mmap=mmap)
        except Exception as e:
            raise ValueError(f"{path} cannot be read as a torch checkpoint: {type(e).__name__}: {e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is truncated or not a torch checkpoint: {type(e).__name__}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        found = list(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} holds no state dict of tensors (top level: {found})")
    return dict(data)


def read_diffusers_weights(folder):
    """State dict of one diffusers / transformers sub-folder (safetensors preferred, fp32 before fp16 variants)."""
    names = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
             "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return {k: v.float() for k, v in read_state_dict(path).items()}, path
    raise ValueError(f"{folder} holds no weights file (looked for {', '.join(names)})")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def with_prefix(state, prefix):
    """Entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------
# Strict matching.


def take_strict(expected, found, source, what, optional=(), reshape_ok=lambda key: False):
    """Tensors of `found` for every name of `expected` (name -> shape), checking both ways.

    Raises one ValueError listing missing names, unexpected names (except `optional`) and shape mismatches.
    `reshape_ok(name)` allows a same-size reshape (1x1 conv <-> linear). Returns name -> tensor (expected shapes).
    """
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected]
    wrong, taken = [], {}
    for key, shape in expected.items():
        if key not in found:
            continue
        value = found[key]
        if tuple(value.shape) != tuple(shape):
            if reshape_ok(key) and value.numel() == torch.Size(shape).numel():
                value = value.reshape(shape)
            else:
                wrong.append(f"{key} {tuple(value.shape)} != {tuple(shape)}")
                continue
        taken[key] = value
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file != network)", wrong)):
        if keys:
            problems.append(f"{label}: " + ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else ""))
    if problems:
        raise ValueError(f"{source}: the {what} does not match its configuration: " + "; ".join(problems))
    return taken


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------
# Name maps.


def ema_name(unet_key):
    """LDM's EMA shadow of `model.diffusion_model.<key>`: 'model_ema.diffusion_model' + key without dots."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_compvis_name(key, unet_cfg):
    """CompVis name of a diffusers UNet2DConditionModel key, for a U-Net built from `unet_cfg`."""
    n = unet_cfg["num_res_blocks"]
    levels = len(unet_cfg["channel_mult"])

    def resnet(rest):
        part, _, tail = rest.partition(".")
        if part not in _RESNET_PARTS:
            raise ValueError(f"unknown diffusers resnet parameter {key!r}")
        return f"{_RESNET_PARTS[part]}.{tail}"

    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", key)
    if m:
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        index = (1 + b * (n + 1) + j) if side == "down_blocks" else (b * (n + 1) + j)
        block = "input_blocks" if side == "down_blocks" else "output_blocks"
        return f"{block}.{index}.0.{resnet(rest)}" if kind == "resnets" else f"{block}.{index}.1.{rest}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", key)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * (n + 1)}.0.op.{m.group(2)}"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", key)
    if m:
        u = int(m.group(1))
        has_attention = 2 ** (levels - 1 - u) in unet_cfg["attention_resolutions"]
        return f"output_blocks.{u * (n + 1) + n}.{2 if has_attention else 1}.conv.{m.group(2)}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", key)
    if m:
        kind, j, rest = m.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(j)}.{resnet(rest)}"
    raise ValueError(f"unknown diffusers UNet parameter {key!r}")


def text_name(key):
    """Text-encoder key without the `text_model.` level that older transformers versions save."""
    return key[len("text_model."):] if key.startswith("text_model.") else key

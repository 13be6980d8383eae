"""Tiny LDM / Stable Diffusion backbones for the tests: configs of the real architecture families at toy size,
random weights, and writers for every checkpoint layout the loader reads (CompVis .ckpt / .safetensors,
diffusers folders, the LDM zip, a separate vq-f4 file), a CLIP tokenizer and a caption CSV."""

import copy
import csv
import json
import os
import zipfile

import torch

from models.latent.checkpoints import SCHEDULE_BUFFERS, ema_name
from models.latent.first_stage import build_first_stage, compvis_name, is_attention_matrix
from models.latent.checkpoints import alphas_cumprod_of
from models.latent.text import build_text_encoder
from models.unet import LatentUNet
from models.registry import Backbone

TINY_LDM = dict(
    schedule=dict(timesteps=1000, linear_start=0.0015, linear_end=0.0195),
    latent=dict(channels=3, resolution=8, scale_factor=1.0),
    use_ema=True,
    unet=dict(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
              channel_mult=[1, 2], num_head_channels=16),
    first_stage=dict(kind="vq", embed_dim=3, n_embed=16, double_z=False, z_channels=3, resolution=16, in_channels=3,
                     out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]),
)

TINY_SD = dict(
    schedule=dict(timesteps=1000, linear_start=0.00085, linear_end=0.012),
    latent=dict(channels=4, resolution=8, scale_factor=0.18215),
    use_ema=False,
    # Like SD's: cross-attention on every level but the last (which has plain down/up blocks).
    unet=dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1,
              channel_mult=[1, 2, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1, context_dim=24,
              legacy=False),
    first_stage=dict(kind="kl", embed_dim=4, double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3,
                     ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]),
    text_encoder=dict(vocab_size=520, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=77),
)

# The diffusers UNet2DConditionModel that TINY_SD's U-Net corresponds to (heads given as attention_head_dim,
# diffusers' legacy spelling, exactly as SD v1's own unet/config.json does).
TINY_SD_DIFFUSERS_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                              block_out_channels=(32, 64, 64), cross_attention_dim=24, attention_head_dim=2,
                              norm_num_groups=32)


def tiny_row(name, config, file_name="model.ckpt", sigma_min=0.006, **extra):
    text = "text_encoder" in config
    return Backbone(dataset_name=name, family="latent", file_name=file_name, url=f"https://example.invalid/{name}.zip",
                    resolution=config["latent"]["resolution"], channels=config["latent"]["channels"], label_dim=0,
                    sigma_min=sigma_min, sigma_max=float(_sigma1(config)),
                    network_class="TextToImagePrecond" if text else "LatentDiffusionPrecond",
                    network_kwargs=dict(config=copy.deepcopy(config), **({"guidance_rate": 7.5} if text else {})),
                    extra_urls={"vq-f4": "https://example.invalid/vq-f4.zip", "captions": "https://example.invalid/c.csv",
                                "tokenizer_vocab": "https://example.invalid/vocab.json",
                                "tokenizer_merges": "https://example.invalid/merges.txt", **extra})


def _sigma1(config):
    return (1 / alphas_cumprod_of(config["schedule"]).double()[-1] - 1).sqrt()


def perturb(module, seed, scale=0.05):
    """Deterministic random offsets on every weight, so that no layer is trivially zero or identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def reference_parts(config, seed=0, step_layers=False):
    """Independent random modules of one tiny backbone: U-Net (CompVis names), first stage, text encoder."""
    torch.manual_seed(seed)
    parts = dict(unet=perturb(LatentUNet(**config["unet"], use_step_condition=step_layers), seed).eval(),
                 first_stage=perturb(build_first_stage(config["first_stage"]), seed + 1).eval())
    if "text_encoder" in config:
        parts["text"] = perturb(build_text_encoder(config["text_encoder"]), seed + 2).eval()
    return parts


def schedule_buffers(config):
    """The 12 DDPM tables LatentDiffusion saves (only alphas_cumprod is checked by value)."""
    ac = alphas_cumprod_of(config["schedule"])
    return {name: (ac if name == "alphas_cumprod" else torch.linspace(0, 1, len(ac))) for name in SCHEDULE_BUFFERS}


def first_stage_compvis(first_stage, config):
    levels = len(config["first_stage"]["ch_mult"])
    out = {}
    for key, value in first_stage.state_dict().items():
        name = compvis_name(key, levels)
        if is_attention_matrix(name):
            value = value[:, :, None, None]  # CompVis keeps these as 1x1 convolutions
        out[name] = value.clone()
    return out


def compvis_state(config, parts, ema_parts=None, with_first_stage=True, text_layout="text_model"):
    """A CompVis/LatentDiffusion state dict: schedule buffers, model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.* and, given `ema_parts`, model_ema.* shadows (decay/num_updates included)."""
    state = dict(schedule_buffers(config))
    state.update({f"model.diffusion_model.{k}": v.clone() for k, v in parts["unet"].state_dict().items()})
    if with_first_stage:
        state.update({f"first_stage_model.{k}": v for k, v in first_stage_compvis(parts["first_stage"], config).items()})
    if "text" in parts:
        # SD v1 files were written by a transformers version with a `text_model.` level and a saved position_ids.
        prefix = "cond_stage_model.transformer." + ("text_model." if text_layout == "text_model" else "")
        for key, value in parts["text"].state_dict().items():
            state[prefix + key.removeprefix("text_model.")] = value.clone()
        state[prefix + "embeddings.position_ids"] = torch.arange(77).float()[None]  # some SD files store floats
    if ema_parts is not None:
        state.update({ema_name(k): v.clone() for k, v in ema_parts["unet"].state_dict().items()})
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return state


def write_ckpt(path, state, extra=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": state, "global_step": 1234, **(extra or {})}, path)
    return path


def write_zip(zip_path, ckpt_path):
    with zipfile.ZipFile(zip_path, "w") as z:
        z.write(ckpt_path, "model.ckpt")
    return zip_path


def bytes_to_unicode():
    """GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder):
    """A tiny CLIP BPE tokenizer (vocab.json + merges.txt): byte alphabet, a few merges, the two special tokens."""
    os.makedirs(folder, exist_ok=True)
    chars = bytes_to_unicode()
    merges = ["a b", "ab c</w>", "t h", "th e</w>", "c a", "ca t</w>"]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def write_captions(path, n=40):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "id", "text"])
        for i in range(n):
            writer.writerow([i, 1000 + i, f"the cat number {i}" if i % 2 else f"a b c {i}"])
    return path


def write_diffusers_folder(folder, config, parts):
    """A diffusers-format SD folder built from the same tiny weights (U-Net converted by diffusers' own
    single-file converter, so the folder does not depend on our name map)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(**TINY_SD_DIFFUSERS_UNET)
    compvis = {f"model.diffusion_model.{k}": v for k, v in parts["unet"].state_dict().items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(compvis, unet.config), strict=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    parts["first_stage"].save_pretrained(os.path.join(folder, "vae"))
    parts["text"].save_pretrained(os.path.join(folder, "text_encoder"))
    write_tokenizer(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    sched = config["schedule"]
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(dict(_class_name="PNDMScheduler", beta_start=sched["linear_start"], beta_end=sched["linear_end"],
                       beta_schedule="scaled_linear", num_train_timesteps=sched["timesteps"]), f)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return folder

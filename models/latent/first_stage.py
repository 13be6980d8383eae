"""The frozen first stage (latent autoencoder) of LDM / Stable Diffusion, as diffusers modules.

  kind 'vq': the VQ-f4 autoencoder of the LSUN-bedroom / FFHQ LDMs -> diffusers VQModel
  kind 'kl': Stable Diffusion's KL autoencoder                      -> diffusers AutoencoderKL

Released checkpoints name these weights the CompVis way (`encoder.down.0.block.1.norm1.weight`,
`decoder.up.3.upsample.conv.weight`, `encoder.mid.attn_1.q.weight` as a 1x1 conv, ...). `compvis_name` maps
each diffusers parameter name to its CompVis name, so a CompVis state dict is loaded by looking every
parameter of the module up in it (strictly: nothing missing, nothing left over, every shape checked).
"""

import re

import torch

FIRST_STAGE_KINDS = ("vq", "kl")


def build_first_stage(cfg):
    """A diffusers VQModel / AutoencoderKL for a `first_stage` config section (CompVis ddconfig keywords)."""
    kind = cfg.get("kind")
    if kind not in FIRST_STAGE_KINDS:
        raise ValueError(f"first_stage.kind must be one of {FIRST_STAGE_KINDS}, got {kind!r}")
    if cfg.get("attn_resolutions"):
        raise ValueError("first_stage.attn_resolutions must be empty (attention only in the middle block)")
    levels = len(cfg["ch_mult"])
    common = dict(in_channels=cfg["in_channels"], out_channels=cfg["out_ch"],
                  down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=tuple(cfg["ch"] * m for m in cfg["ch_mult"]),
                  layers_per_block=cfg["num_res_blocks"], act_fn="silu", latent_channels=cfg["z_channels"],
                  norm_num_groups=32, sample_size=cfg["resolution"])
    if kind == "vq":
        from diffusers.models.autoencoders.vq_model import VQModel

        return VQModel(num_vq_embeddings=cfg["n_embed"], vq_embed_dim=cfg["embed_dim"], **common)
    if cfg["embed_dim"] != cfg["z_channels"] or not cfg.get("double_z", True):
        raise ValueError("first_stage kind 'kl' needs embed_dim == z_channels and double_z: true (as SD v1)")
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return AutoencoderKL(**common)


@torch.no_grad()
def decode(first_stage, z):
    """Latents (already divided by the scale factor) -> images, as CompVis' decode_first_stage: the VQ model
    snaps z to its codebook first."""
    return first_stage.decode(z).sample


# diffusers name -> CompVis name. Applied in order; `{up}` is filled with the CompVis level of a decoder block.
_RULES = (
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{up}.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"decoder.up.{up}.upsample.conv."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", r".nin_shortcut."),
)

# Older diffusers folders (e.g. SD v1.5's own) still use these names for the middle attention block.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def compvis_name(key, num_levels):
    """CompVis name of a diffusers VQModel / AutoencoderKL state_dict key."""
    up = None
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.", key)
    if m:
        up = num_levels - 1 - int(m.group(1))  # diffusers counts decoder blocks from the bottom, CompVis from the top
    for pattern, replacement in _RULES:
        key = re.sub(pattern, replacement.replace("{up}", str(up)), key)
    return key


def is_attention_matrix(key):
    """Middle-block attention projections: Linear in diffusers, 1x1 Conv2d in CompVis files."""
    pattern = r"\.mid(_block)?\.(attn_1|attentions\.0)\.(q|k|v|proj_out|to_q|to_k|to_v|to_out\.0)\.weight$"
    return re.search(pattern, key) is not None


def modern_diffusers_name(key):
    for old, new in _LEGACY_ATTENTION.items():
        key = key.replace(old, new)
    return key

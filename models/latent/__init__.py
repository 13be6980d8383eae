"""Latent-space backbones: the LDMs on LSUN bedrooms / FFHQ and Stable Diffusion v1.5 (design §6).

    unet.py         CompVis' U-Net with its parameter names (+ SFD-v's nfe_embed / emb_nfe_layers)
    precond.py      VP discrete preconditioning, classifier-free guidance, decoding, prompts, captions
    first_stage.py  the frozen VQ / KL autoencoders (diffusers modules) and their CompVis names
    text.py         the frozen CLIP text encoder (transformers) and the MS-COCO caption file
    checkpoints.py  reading .ckpt / .safetensors / diffusers folders; strict name and shape matching
    loading.py      the loader family 'latent': where the files are, and building a network from them

Importing this package registers the family with models.loader and the two network classes with the
snapshot format. diffusers / transformers are imported only when a first stage or text encoder is built; both
import torchvision, made importable first where its wheel does not match a CPU-only torch (torch_utils).
"""

from torch_utils.torchvision_compat import allow_import

from ..loader import register_family
from .loading import build_latent, load_config
from .precond import LatentDiffusionPrecond, TextToImagePrecond
from ..unet import LatentUNet

allow_import()
register_family("latent", build_latent, finds_files=True)

__all__ = ["LatentDiffusionPrecond", "LatentUNet", "TextToImagePrecond", "build_latent", "load_config"]

"""Backbones, preconditioning, the backbone table, the one loader and our snapshot format."""

from .edm import DhariwalUNet, RecordedModule, SongUNet
from .loader import LoadedNetwork, load_network
from .precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from .registry import BACKBONES, Backbone, get_backbone
from .snapshot import NETWORK_CLASSES, load_snapshot, register_network_class, save_snapshot
from .unet import OpenAIUNet
from .latent import LatentDiffusionPrecond, TextToImagePrecond  # registers the 'latent' loader family
from . import diffusers_pipeline  # noqa: F401  (registers the diffusers pipeline network classes)

__all__ = [
    "BACKBONES", "Backbone", "DhariwalUNet", "EDMPrecond", "LatentDiffusionPrecond", "LoadedNetwork",
    "NETWORK_CLASSES", "OpenAIUNet", "RecordedModule", "SongUNet", "TextToImagePrecond", "VEPrecond", "VPPrecond", "get_backbone",
    "iDDPMPrecond", "load_network", "load_snapshot", "register_network_class", "save_snapshot",
]

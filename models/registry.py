"""The table of pre-trained backbones that `--dataset_name` selects (design §6).

One row per dataset: where its checkpoint comes from (a URL downloaded once into
`./src/{dataset_name}/`, or a file shipped in this repository), what it generates, the noise range SFD
uses with it, and the constructor keywords of its network. `models.loader.load_network` reads the row;
adding a backbone is adding a row (and, for a new `family`, one builder in the loader).
"""

import copy
from dataclasses import dataclass, field

EDM_CDN = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"

# The noise range the paper distils EDM teachers over (its sigma_min is also LDM's); the loader uses it for an EDM
# pickle given without a dataset_name.
PAPER_SIGMA_MIN = 0.006
EDM_SIGMA_MAX = 80.0


@dataclass(frozen=True)
class Backbone:
    dataset_name: str
    family: str                 # how the checkpoint is read: 'edm' = EDM-format network pickle
    file_name: str              # name of the checkpoint file in the cache folder
    resolution: int             # generated image (or latent) side length
    channels: int
    label_dim: int              # number of classes, 0 = unconditional
    sigma_min: float            # noise range SFD's schedules use with this backbone
    sigma_max: float
    network_class: str = "EDMPrecond"
    network_kwargs: dict = field(default_factory=dict)  # constructor keywords besides the interface ones
    url: str = None             # download source, or None when `path` is given
    path: str = None            # repo-relative file shipped with the code (used instead of a download)
    description: str = ""
    extra_urls: dict = field(default_factory=dict)  # other downloads the family needs (name -> URL)

    def __post_init__(self):
        if (self.url is None) == (self.path is None):
            raise ValueError(f"backbone {self.dataset_name!r}: give exactly one of url= and path=")

    def interface_kwargs(self):
        """Constructor keywords of the network class for this backbone (a fresh copy)."""
        return dict(img_resolution=self.resolution, img_channels=self.channels, label_dim=self.label_dim,
                    sigma_min=self.sigma_min, sigma_max=self.sigma_max, **copy.deepcopy(self.network_kwargs))


# EDM's DDPM++ settings for its VP checkpoints (EDM train.py, --arch=ddpmpp); cifar10 and 64x64 differ
# only in channel_mult and dropout. use_fp16 stays off: the paper builds its teachers in fp32.
_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, augment_dim=9, use_fp16=False)


def _edm(dataset_name, file_name, resolution, label_dim, network_kwargs, description):
    return Backbone(dataset_name=dataset_name, family="edm", file_name=file_name, url=f"{EDM_CDN}/{file_name}",
                    resolution=resolution, channels=3, label_dim=label_dim, sigma_min=PAPER_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX,
                    network_kwargs=network_kwargs, description=description)


BACKBONES = {
    row.dataset_name: row
    for row in (
        _edm("cifar10", "edm-cifar10-32x32-uncond-vp.pkl", 32, 0,
             dict(_DDPMPP, channel_mult=[2, 2, 2], dropout=0.13), "EDM DDPM++ VP, CIFAR-10 32x32, unconditional"),
        _edm("ffhq", "edm-ffhq-64x64-uncond-vp.pkl", 64, 0,
             dict(_DDPMPP, channel_mult=[1, 2, 2, 2], dropout=0.05), "EDM DDPM++ VP, FFHQ 64x64, unconditional"),
        _edm("afhqv2", "edm-afhqv2-64x64-uncond-vp.pkl", 64, 0,
             dict(_DDPMPP, channel_mult=[1, 2, 2, 2], dropout=0.05), "EDM DDPM++ VP, AFHQv2 64x64, unconditional"),
        _edm("imagenet64", "edm-imagenet-64x64-cond-adm.pkl", 64, 1000,
             dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10, use_fp16=False),
             "EDM ADM, ImageNet 64x64, class-conditional"),
    )
}


# Latent-space backbones (loader family 'latent', models/latent/): configuration in models/configs/{config}.yaml.
# sigma_max = sigma(t=1) of each model's own discrete schedule; sigma_min as in the paper (LDM: PAPER_SIGMA_MIN, SD 0.1).
# URLs as in the paper's torch_utils/download_util.py; SD v1.5 also from its maintained mirror.
LDM_FILES = "https://ommer-lab.com/files/latent-diffusion"
CLIP_L14 = "https://huggingface.co/openai/clip-vit-large-patch14/resolve/main"


def _ldm(dataset_name, archive, description):
    return Backbone(dataset_name=dataset_name, family="latent", file_name="model.ckpt", url=f"{LDM_FILES}/{archive}",
                    resolution=64, channels=3, label_dim=0, sigma_min=PAPER_SIGMA_MIN, sigma_max=83.82249324131595,
                    network_class="LatentDiffusionPrecond", network_kwargs=dict(config=dataset_name),
                    extra_urls={"vq-f4": f"{LDM_FILES}/vq-f4.zip"}, description=description)


BACKBONES.update((row.dataset_name, row) for row in (
    _ldm("lsun_bedroom_ldm", "lsun_bedrooms.zip", "LDM-VQ-4, LSUN bedrooms 256x256 (64x64x3 latents), unconditional"),
    _ldm("ffhq_ldm", "ffhq.zip", "LDM-VQ-4, FFHQ 256x256 (64x64x3 latents), unconditional"),
    Backbone(dataset_name="ms_coco", family="latent", file_name="v1-5-pruned-emaonly.ckpt",
             url="https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.ckpt",
             resolution=64, channels=4, label_dim=0, sigma_min=0.1, sigma_max=14.614641489691586,
             network_class="TextToImagePrecond", network_kwargs=dict(config="ms_coco", guidance_rate=7.5),
             extra_urls={
                 "mirror": "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                           "v1-5-pruned-emaonly.ckpt",
                 "tokenizer_vocab": f"{CLIP_L14}/vocab.json",
                 "tokenizer_merges": f"{CLIP_L14}/merges.txt",
                 "captions": "https://github.com/boomb0om/text2image-benchmark/releases/download/v0.0.1/"
                             "MS-COCO_val2014_30k_captions.csv",
             },
             description="Stable Diffusion v1.5, 512x512 (64x64x4 latents), CLIP ViT-L/14 text, classifier-free guidance"),
))

# Consistency Models' EDM teacher on LSUN Bedroom 256 (loader family 'state_dict': a plain tensor dict). The paper's
# list names it but its code never builds it. EDM preconditioning over OpenAI's U-Net (models/unet.py, settings as
# released); the noise range is the paper's for its EDM teachers (Consistency Models sample from 0.002).
BACKBONES["lsun_bedroom"] = Backbone(
    dataset_name="lsun_bedroom", family="state_dict", file_name="edm_bedroom256_ema.pt",
    url="https://openaipublic.blob.core.windows.net/consistency/edm_bedroom256_ema.pt",
    resolution=256, channels=3, label_dim=0, sigma_min=PAPER_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX,
    network_kwargs=dict(model_type="OpenAIUNet", model_channels=256, channel_mult=[1, 1, 2, 2, 4, 4], num_blocks=2,
                        attn_resolutions=[32, 16, 8], channels_per_head=64, dropout=0.1, use_fp16=False),
    description="EDM on LSUN Bedroom 256x256 (Consistency Models' teacher, OpenAI U-Net), unconditional")


# The built-in teacher shipped with the code (experiments/train_teacher.py on Fashion-MNIST; see assets/README.md): the
# offline quickstart and the reproducible table run on it.
BACKBONES["fmnist"] = Backbone(
    dataset_name="fmnist", family="edm", file_name="fmnist-teacher.pkl", path="assets/fmnist-teacher.pkl",
    resolution=32, channels=1, label_dim=0, sigma_min=PAPER_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX,
    network_kwargs=dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2, 4], num_blocks=2,
                        attn_resolutions=[8], dropout=0.0, augment_dim=0),
    description="built-in DDPM++-style teacher, Fashion-MNIST 32x32 grayscale, unconditional (experiments/train_teacher.py)")


def get_backbone(dataset_name):
    if dataset_name not in BACKBONES:
        raise ValueError(f"unknown dataset_name {dataset_name!r}: use one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[dataset_name]

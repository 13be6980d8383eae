"""Tiny diffusers pipeline folders for the tests, built with diffusers' own classes and save_pretrained (random
weights, no download): a pixel DDPM pipeline (UNet2DModel) and an SD-2-style text-to-image pipeline
(UNet2DConditionModel with linear projections, CLIP text encoder, KL autoencoder, CLIP tokenizer)."""

import os

import torch

from tests.latent_tiny import TINY_SD, perturb, write_tokenizer

TINY_PIXEL_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=8, norm_num_groups=8)

# SD 2.x's U-Net differs from 1.x's by linear projections in its transformers and per-level head counts.
TINY_SD2_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 32),
                     cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)


def write_pixel_pipeline(folder, prediction_type="epsilon", seed=0, scheduler="DDPMScheduler", **unet_extra):
    """A DDPMPipeline folder: UNet2DModel + a linear-beta DDPM scheduler config."""
    import diffusers

    torch.manual_seed(seed)
    unet = perturb(diffusers.UNet2DModel(**TINY_PIXEL_UNET, **unet_extra), seed).eval()
    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


def write_sd_pipeline(folder, prediction_type="v_prediction", seed=0):
    """A StableDiffusionPipeline folder shaped like SD 2.x (v_prediction, scaled_linear DDIM config, leading
    timestep spacing with steps_offset 1), no safety checker."""
    import diffusers
    from transformers import CLIPTokenizer

    from models.latent.first_stage import build_first_stage
    from models.latent.text import build_text_encoder

    torch.manual_seed(seed)
    unet = perturb(diffusers.UNet2DConditionModel(**TINY_SD2_UNET), seed).eval()
    vae = perturb(build_first_stage(TINY_SD["first_stage"]), seed + 1).eval()
    text = perturb(build_text_encoder(TINY_SD["text_encoder"]), seed + 2).eval()
    tok_dir = write_tokenizer(os.path.join(folder + ".tok"))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77, local_files_only=True)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
                                    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder

"""The modules built from the REAL configurations (models/configs/*.yaml) expose exactly the names and shapes of
the released checkpoints.

tests/data/manifests/{dataset}.tsv.gz lists every state_dict entry (key, shape, kind) of the CompVis
LatentDiffusion module built from the public configs (latent-diffusion lsun_bedrooms-ldm-vq-4.yaml /
ffhq-ldm-vq-4.yaml, stable-diffusion v1-inference.yaml) on the meta device; kind 'sfd-extra' marks the SFD-v
layers the paper's code adds (not in the released files). Here our modules are built on the meta device
(no memory, no init cost) and mapped to CompVis names with the same functions the loader uses.
"""

import gzip
import json
import os

import pytest
import torch

from models import BACKBONES
from models.latent.checkpoints import SCHEDULE_BUFFERS, ema_name, text_name
from models.latent.first_stage import build_first_stage, compvis_name, is_attention_matrix
from models.latent.loading import load_config
from models.latent.text import build_text_encoder
from models.edm import is_step_layer_key
from models.unet import LatentUNet

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "manifests")


def read_manifest(name):
    rows = {}
    with gzip.open(os.path.join(DATA, f"{name}.tsv.gz"), "rt") as f:
        for line in f:
            key, shape, kind = line.rstrip("\n").split("\t")
            rows[key] = (tuple(json.loads(shape)), kind)
    return rows


def our_entries(name):
    """(CompVis name -> shape) of what our loader requires / builds, and the SFD-v extras, for a real config."""
    config = load_config(name)
    with torch.device("meta"):
        unet = LatentUNet(**config["unet"], use_step_condition=True)
        first_stage = build_first_stage(config["first_stage"])
        text = build_text_encoder(config["text_encoder"]) if "text_encoder" in config else None
    levels = len(config["first_stage"]["ch_mult"])
    plain, extra = {k: (config["schedule"]["timesteps"],) for k in SCHEDULE_BUFFERS}, {}
    for key, value in unet.state_dict().items():
        (extra if is_step_layer_key(key) else plain)[f"model.diffusion_model.{key}"] = tuple(value.shape)
        if config.get("use_ema"):  # LDM's EMA shadows of every U-Net weight
            (extra if is_step_layer_key(key) else plain)[ema_name(key)] = tuple(value.shape)
    if config.get("use_ema"):
        plain.update({"model_ema.decay": (), "model_ema.num_updates": ()})
    for key, value in first_stage.state_dict().items():
        name = compvis_name(key, levels)
        plain[f"first_stage_model.{name}"] = tuple(value.shape) + ((1, 1) if is_attention_matrix(name) else ())
    if text is not None:
        prefix = "cond_stage_model.transformer.text_model."
        plain.update({prefix + text_name(k): tuple(v.shape) for k, v in text.state_dict().items()})
        plain[prefix + "embeddings.position_ids"] = (1, config["text_encoder"]["max_position_embeddings"])
    counts = dict(unet=sum(p.numel() for n, p in unet.named_parameters() if not is_step_layer_key(n)),
                  first_stage=sum(p.numel() for p in first_stage.parameters()),
                  text=sum(p.numel() for p in text.parameters()) if text is not None else 0)
    return plain, extra, counts


@pytest.mark.parametrize("name", ["lsun_bedroom_ldm", "ffhq_ldm", "ms_coco"])
def test_real_configurations_match_the_released_key_and_shape_lists(name):
    manifest = read_manifest(name)
    plain, extra, _ = our_entries(name)
    released = {k: shape for k, (shape, kind) in manifest.items() if kind in ("param", "buffer")}
    sfd_extra = {k: shape for k, (shape, kind) in manifest.items() if kind == "sfd-extra"}
    assert sorted(set(released) - set(plain))[:5] == [] and sorted(set(plain) - set(released))[:5] == []
    assert {k: v for k, v in released.items() if plain[k] != v} == {}
    assert extra == sfd_extra
    assert len(manifest) == {"ms_coco": 1191}.get(name, 1051)


def test_parameter_counts_are_the_published_ones():
    _, _, sd = our_entries("ms_coco")
    # Stable Diffusion v1: U-Net 859.52M, KL-f8 autoencoder 83.65M, CLIP ViT-L/14 text tower 123.06M parameters.
    assert sd["unet"] == 859_520_964 and sd["first_stage"] == 83_653_863 and sd["text"] == 123_060_480
    _, _, ldm = our_entries("ffhq_ldm")
    assert round(ldm["unet"] / 1e6) == 274  # LDM-4 on FFHQ / LSUN bedrooms: 274M (Rombach et al. 2022, Tab. 16)


def test_table_rows_of_the_latent_backbones():
    for name, url in (("lsun_bedroom_ldm", "lsun_bedrooms.zip"), ("ffhq_ldm", "ffhq.zip")):
        row = BACKBONES[name]
        assert row.url == f"https://ommer-lab.com/files/latent-diffusion/{url}" and row.file_name == "model.ckpt"
        assert row.extra_urls["vq-f4"] == "https://ommer-lab.com/files/latent-diffusion/vq-f4.zip"
        assert (row.resolution, row.channels, row.sigma_min) == (64, 3, 0.006)
    row = BACKBONES["ms_coco"]
    assert row.url.endswith("/v1-5-pruned-emaonly.ckpt") and (row.resolution, row.channels, row.sigma_min) == (64, 4, 0.1)
    assert row.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert row.extra_urls["captions"].endswith("/MS-COCO_val2014_30k_captions.csv")

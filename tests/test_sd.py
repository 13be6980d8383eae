"""Stable Diffusion backbone (ms_coco): the U-Net against diffusers, the autoencoder names against diffusers'
single-file converter, loading SD's single file (.ckpt / .safetensors) and a diffusers folder, classifier-free
guidance, prompts and captions, offline errors, and a tiny SFD run through train.py then sample.py (prompt and
caption-by-seed) writing decoded PNGs. CPU, toy sizes, tiny tokenizer written by the test."""

import glob
import os
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from models import BACKBONES, load_network, load_snapshot
from models.latent.checkpoints import unet_compvis_name
from models.latent.text import SEED_CAPTIONS_FILE, captions_by_seed
from models.latent.precond import TextToImagePrecond
from tests.conftest import DEVICES, convolution_dtypes
from tests.latent_tiny import (TINY_SD, TINY_SD_DIFFUSERS_UNET, compvis_state, first_stage_compvis, reference_parts,
                               tiny_row, write_captions, write_ckpt, write_diffusers_folder, write_tokenizer)

NAME = "tiny_sd"


@pytest.fixture(scope="module")
def parts():
    return reference_parts(TINY_SD, seed=11)


@pytest.fixture
def installed(tmp_path, monkeypatch, parts):
    """A tiny SD row with its single-file checkpoint, tokenizer and captions already in the cache folder."""
    row = tiny_row(NAME, TINY_SD, file_name="v1-5-pruned-emaonly.ckpt", sigma_min=0.1)
    monkeypatch.setitem(BACKBONES, NAME, row)
    folder = tmp_path / "src" / NAME
    write_ckpt(str(folder / row.file_name), compvis_state(TINY_SD, parts))
    write_tokenizer(str(folder / "tokenizer"))
    write_captions(str(folder / "c.csv"))
    return row, tmp_path / "src"


def reference_text(parts, folder, prompts):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return parts["text"](input_ids=ids).last_hidden_state


def test_unet_equals_diffusers_unet_converted_by_diffusers(parts):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = parts["unet"]
    compvis = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    ref = UNet2DConditionModel(**TINY_SD_DIFFUSERS_UNET).eval()
    converted = convert_ldm_unet_checkpoint(compvis, ref.config)
    ref.load_state_dict(converted, strict=True)
    # Our diffusers -> CompVis map (used for diffusers folders) is the exact inverse of diffusers' converter.
    assert all(torch.equal(v, compvis[f"model.diffusion_model.{unet_compvis_name(k, TINY_SD['unet'])}"])
               for k, v in converted.items())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([-0.5, 812.25]), torch.randn(2, 5, 24)
    with torch.no_grad():
        a, b = ours(x, t, context=ctx), ref(x, t, encoder_hidden_states=ctx).sample
    assert a.abs().mean() > 0.1 and torch.allclose(a, b, atol=1e-5)


def test_autoencoder_names_agree_with_diffusers_converter(parts):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = parts["first_stage"]
    compvis = {f"first_stage_model.{k}": v for k, v in first_stage_compvis(vae, TINY_SD).items()}
    converted = convert_ldm_vae_checkpoint(compvis, vae.config)
    own = vae.state_dict()
    assert set(converted) == set(own)
    assert all(torch.equal(converted[k].reshape(own[k].shape), own[k]) for k in own)


@pytest.mark.parametrize("layout", ["ckpt", "safetensors", "diffusers"])
def test_every_published_layout_loads_the_same_network(tmp_path, installed, parts, layout):
    row, cache = installed
    model_path = None
    if layout == "safetensors":
        from safetensors.torch import save_file

        os.remove(cache / NAME / row.file_name)
        save_file({k: v.contiguous() for k, v in compvis_state(TINY_SD, parts, text_layout="flat").items()},
                  str(cache / NAME / "v1-5-pruned-emaonly.safetensors"))
    elif layout == "diffusers":
        model_path = write_diffusers_folder(str(tmp_path / "sd-diffusers"), TINY_SD, parts)
    net = load_network(NAME, model_path=model_path, cache_root=str(cache)).net
    assert isinstance(net, TextToImagePrecond) and net.guidance_type == "cfg" and net.guidance_rate == 7.5
    source = parts["unet"].state_dict()
    own = net.model.diffusion_model.state_dict()
    assert set(own) == set(source) and all(torch.equal(own[k], source[k]) for k in own)

    prompts = ["the cat", "abc abc"]
    cond, uncond = net.encode_prompts(prompts)
    assert cond.shape == (2, 77, 24) and uncond.shape == (2, 77, 24)
    assert torch.allclose(cond, reference_text(parts, cache / NAME / "tokenizer", prompts), atol=1e-5)
    assert torch.allclose(uncond[0], reference_text(parts, cache / NAME / "tokenizer", [""])[0], atol=1e-5)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = parts["first_stage"].decode(z / 0.18215).sample.clamp(-1, 1)
    assert torch.allclose(net.decode_latents(z), expected, atol=1e-5)


def test_classifier_free_guidance(installed):
    _, cache = installed
    net = load_network(NAME, cache_root=str(cache)).net
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(3.0)
    cond, uncond = net.encode_prompts(["the cat", "a b c"])
    unet = net.model.diffusion_model
    with torch.no_grad():
        x_in, t = x / (sigma ** 2 + 1).sqrt(), (1000 * net.sigma_inv(sigma) - 1).expand(2)
        eps_c, eps_u = unet(x_in, t, context=cond), unet(x_in, t, context=uncond)
        net.guidance_rate = 7.5
        guided = net(x, sigma, condition=cond, unconditional_condition=uncond)
        # The network runs cond and uncond as one batch of 4, the reference as two batches of 2: float32 rounding
        # of the U-Net (~1e-6 of its largest output) is amplified by the guidance weight and by sigma.
        scale = float(x.abs().max() + sigma * 8.5 * torch.maximum(eps_c.abs().max(), eps_u.abs().max()))
        torch.testing.assert_close(guided, x - sigma * (eps_u + 7.5 * (eps_c - eps_u)), rtol=0, atol=1e-5 * scale)
        net.guidance_rate = 1.0  # training: the conditional prediction alone, one U-Net pass
        torch.testing.assert_close(net(x, sigma, condition=cond, unconditional_condition=uncond), x - sigma * eps_c,
                                   rtol=0, atol=1e-5 * scale)
        assert net.encode_prompts(["the cat"])[1] is None
    with pytest.raises(ValueError, match="text-conditioned"):
        net(x, sigma)


def test_captions_by_seed_and_for_training(installed, monkeypatch):
    _, cache = installed
    net = load_network(NAME, cache_root=str(cache)).net
    assert net.captions_for_seeds([3, 0]) == ["the cat number 3", "a b c 0"]
    with pytest.raises(ValueError, match="seed 40 has no caption"):
        net.captions_for_seeds([39, 40])
    torch.manual_seed(0)
    net.guidance_rate = 1.0  # as the training loop sets it
    cond, uncond = net.draw_conditions(4, torch.device("cpu"))
    assert cond.shape == (4, 77, 24) and uncond is None  # training runs with guidance 1 (no unconditional half)
    assert all(not torch.allclose(cond[i], cond[j]) for i in range(4) for j in range(i))  # distinct captions
    local = write_captions(str(cache.parent / "mine.csv"), n=5)  # a local caption file instead of the download
    fresh = load_network(NAME, cache_root=str(cache)).net
    fresh.use_caption_file(local)
    with pytest.raises(ValueError, match="5 rows"):
        fresh.captions_for_seeds([5])
    assert net.captions_for_seeds([39]) == ["the cat number 39"]  # another network keeps the download


def test_without_weights_ms_coco_fails_fast_naming_file_urls_and_folder(tmp_path):
    start = time.time()
    with pytest.raises(dnnlib.DownloadError) as err:
        load_network("ms_coco", cache_root=str(tmp_path))
    message = str(err.value)
    assert time.time() - start < 5 and "\n" not in message
    assert "v1-5-pruned-emaonly.ckpt" in message and os.path.join(str(tmp_path), "ms_coco") in message
    assert "https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.ckpt" in message
    assert BACKBONES["ms_coco"].extra_urls["mirror"] in message


def test_sfd_training_and_sampling_end_to_end(tmp_path, installed, parts, monkeypatch):
    import sample
    import train

    monkeypatch.chdir(tmp_path)
    base = ["--dataset_name", NAME, "--batch", "2", "--total_kimg", "0.002", "--seed", "0", "--device", "cpu",
            "--schedule_type", "discrete", "--sampler_tea", "dpmpp", "--M", "1"]
    wrong = CliRunner().invoke(train.main, base)
    assert wrong.exit_code == 2 and "--guidance_type=cfg" in wrong.output and not os.path.exists("exps")
    result = CliRunner().invoke(train.main, base + ["--guidance_type", "cfg", "--guidance_rate", "7.5"])
    assert result.exit_code == 0, result.output
    run = glob.glob("exps/00000-tiny_sd-4-4-dpmpp-1-discrete7.0-afs")  # NFE doubled by guidance
    assert run, os.listdir("exps")
    snap = glob.glob(os.path.join(run[0], "network-snapshot-*.safetensors"))[0]
    net, settings = load_snapshot(snap)
    assert settings["guidance_type"] == "cfg" and settings["guidance_rate"] == 7.5
    assert all(k.startswith("model.diffusion_model.") or k == "alphas_cumprod" for k in net.state_dict())
    trained = net.model.diffusion_model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in parts["unet"].state_dict().items())

    prompt = CliRunner().invoke(sample.main, ["--model_path", "0", "--seeds", "0-1", "--batch", "2", "--device", "cpu",
                                              "--outdir", "prompt", "--prompt", "the cat"])
    assert prompt.exit_code == 0, prompt.output
    assert "NFE 4" in prompt.output  # 2 steps with AFS, two U-Net halves each under guidance
    by_seed = CliRunner().invoke(sample.main, ["--model_path", "0", "--seeds", "0-1", "--batch", "2", "--device", "cpu",
                                               "--outdir", "seeded"])
    assert by_seed.exit_code == 0, by_seed.output
    a, b = (np.asarray(PIL.Image.open(f"{d}/000000/000001.png")) for d in ("prompt", "seeded"))
    assert a.shape == b.shape == (16, 16, 3)
    assert not np.array_equal(a, b)  # same seed, different text: the caption of row 1 was used
    # Beside the images, the caption each seed was sampled with (clip_score.py checks its pairing against it).
    assert captions_by_seed(f"prompt/{SEED_CAPTIONS_FILE}") == {0: "the cat", 1: "the cat"}
    assert captions_by_seed(f"seeded/{SEED_CAPTIONS_FILE}") == {0: "a b c 0", 1: "the cat number 1"}

    # --captions: a local caption file (row = seed) instead of the cached download.
    with open("mine.csv", "w") as f:
        f.write("image_id,id,text\n0,1,a red bus\n1,2,a red bus\n2,3,a blue bus\n")
    local = CliRunner().invoke(sample.main, ["--model_path", "0", "--seeds", "0-1", "--batch", "2", "--device", "cpu",
                                             "--outdir", "local", "--captions", "mine.csv"])
    assert local.exit_code == 0, local.output
    c = np.asarray(PIL.Image.open("local/000000/000001.png"))
    assert not np.array_equal(b, c)
    more = CliRunner().invoke(sample.main, ["--model_path", "0", "--seeds", "2", "--device", "cpu", "--outdir",
                                            "local", "--captions", "mine.csv"])
    assert more.exit_code == 0, more.output  # a second run into the folder adds its seeds to the record
    assert captions_by_seed(f"local/{SEED_CAPTIONS_FILE}") == {0: "a red bus", 1: "a red bus", 2: "a blue bus"}

    # train.py --captions reaches the training loop, which loads the network and draws its captions from that file.
    with open("one.csv", "w") as f:
        f.write("image_id,id,text\n0,1,a red bus\n")
    one = CliRunner().invoke(train.main, base + ["--guidance_type", "cfg", "--guidance_rate", "7.5", "--captions",
                                                 "one.csv"])
    assert one.exit_code == 2 and "cannot draw 2 distinct captions from 1" in one.output, one.output


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_the_unet_in_half_on_cuda_only_and_stays_close(installed, device):
    """use_fp16 on the latent wrapper: float16 U-Net convolutions under autocast on CUDA, close to fp32; on a CPU
    the same calls stay float32 and give the fp32 result exactly."""
    _, cache = installed
    net = load_network(NAME, cache_root=str(cache), device=device).net
    x, sigma = torch.randn(2, 4, 8, 8, device=device), torch.tensor(3.0, device=device)
    cond, uncond = net.encode_prompts(["the cat", "abc"])
    with torch.no_grad():
        full, full_dtypes = convolution_dtypes(lambda: net(x, sigma, condition=cond, unconditional_condition=uncond))
        net.use_fp16 = True
        half, half_dtypes = convolution_dtypes(lambda: net(x, sigma, condition=cond, unconditional_condition=uncond))
    assert half.dtype == torch.float32 and full_dtypes == {torch.float32}
    if device == "cuda":
        assert half_dtypes == {torch.float16}
        assert 0 < (half - full).abs().max() < 0.05 * full.abs().max()
    else:
        assert half_dtypes == {torch.float32} and torch.equal(half, full)


def test_sample_py_samples_a_pretrained_diffusers_folder(tmp_path, installed, parts, monkeypatch):
    import sample

    monkeypatch.chdir(tmp_path)
    folder = write_diffusers_folder(str(tmp_path / "sd-diffusers"), TINY_SD, parts)
    r = CliRunner().invoke(sample.main, ["--dataset_name", NAME, "--model_path", folder, "--solver", "euler",
                                         "--num_steps", "3", "--schedule_type", "discrete", "--seeds", "0-1",
                                         "--prompt", "the cat", "--device", "cpu", "--outdir", "out"])
    assert r.exit_code == 0, r.output
    assert "NFE 4" in r.output  # 2 Euler steps, both guidance halves
    assert len(glob.glob("out/*/*.png")) == 2


def test_an_official_safetensors_file_given_as_model_path_loads(tmp_path, installed, parts):
    from safetensors.torch import save_file

    row, cache = installed
    path = str(tmp_path / "elsewhere" / "my-sd.safetensors")
    os.makedirs(os.path.dirname(path))
    save_file({k: v.contiguous() for k, v in compvis_state(TINY_SD, parts, text_layout="flat").items()}, path)
    net = load_network(NAME, model_path=path, cache_root=str(cache)).net
    own, source = net.model.diffusion_model.state_dict(), parts["unet"].state_dict()
    assert set(own) == set(source) and all(torch.equal(own[k], source[k]) for k in own)
    with pytest.raises(ValueError, match="pass its --dataset_name"):  # without the backbone it is not guessed
        load_network(model_path=path, cache_root=str(cache))

"""The `lsun_bedroom` backbone (Consistency Models' EDM teacher, OpenAI U-Net): strict loading of a file in the
release's layout against diffusers' UNet2DModel as the reference, the qkv channel order, the real configuration's
keys against the manifest, SFD / SFD-v / second stage through train.py and sample.py, and the offline error.
All on CPU with a tiny configuration of the same architecture."""

import dataclasses
import glob
import gzip
import json
import os
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from benchmarks.bench_openai_unet import diffusers_unet
from models import BACKBONES, load_network, load_snapshot
from models.precond import EDMPrecond
from models.unet import AttentionBlock
from tests.conftest import DEVICES, convolution_dtypes

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "data", "manifests", "lsun_bedroom_cm.tsv.gz")
# The released settings (resblock up/down, 64-channel heads, Conv2d qkv) at toy widths: 16 px, three levels,
# attention at 8 and 4 px (4 heads at 64 channels) and in the middle block.
TINY = dict(model_type="OpenAIUNet", model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8, 4],
            channels_per_head=16, dropout=0.1, use_fp16=False)
RES = 16


@pytest.fixture
def tiny_bedroom(tmp_path, monkeypatch):
    """A `tiny_bedroom` table row with lsun_bedroom's family and loader, its file in the cache as the release
    stores it (a flat float16 tensor dict under the U-Net's own keys)."""
    row = dataclasses.replace(BACKBONES["lsun_bedroom"], dataset_name="tiny_bedroom", resolution=RES,
                              network_kwargs=dict(TINY), url="http://127.0.0.1:9/edm_bedroom256_ema.pt")
    monkeypatch.setitem(BACKBONES, "tiny_bedroom", row)
    torch.manual_seed(11)
    net = EDMPrecond(img_resolution=RES, img_channels=3, **TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k[len("model."):]: v.half() for k, v in net.state_dict().items()}
    path = tmp_path / "src" / "tiny_bedroom" / row.file_name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return row, {k: v.float() for k, v in state.items()}, str(path)


def reference_denoiser(unet, x, sigma, sigma_data=0.5):
    """EDM's scalings around the reference U-Net; its timestep input is 1000 c_noise = 250 ln(sigma)."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out = sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s * sigma_data / (s ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (s ** 2 + sigma_data ** 2).sqrt()
    return c_skip * x + c_out * unet(c_in * x, 250 * sigma.log()).sample


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_file_loads_strictly_and_denoises_like_diffusers(tiny_bedroom):
    row, state, path = tiny_bedroom
    loaded = load_network("tiny_bedroom", model_path=path)
    net = loaded.net
    assert loaded.source == "pretrained" and (net.sigma_min, net.sigma_max) == (0.006, 80.0)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the float16 file is cast on load
    for key, value in state.items():
        assert torch.equal(net.state_dict()[f"model.{key}"], value), key
    attends = [RES >> level in TINY["attn_resolutions"] for level in range(len(TINY["channel_mult"]))]
    reference = diffusers_unet(state, RES, [TINY["model_channels"] * m for m in TINY["channel_mult"]], attends,
                               TINY["num_blocks"], TINY["channels_per_head"])
    torch.manual_seed(0)
    x, sigma = torch.randn(3, 3, RES, RES) * 2, torch.tensor([0.01, 1.3, 60.0])
    with torch.no_grad():
        ours, theirs = net(x, sigma), reference_denoiser(reference, x, sigma)
    assert _max_rel(ours, theirs) < 1e-5, _max_rel(ours, theirs)

    # The same weights read with the LDM's per-head q/k/v order run, but denoise differently: this test sees it.
    for module in net.modules():
        if isinstance(module, AttentionBlock):
            module.layout = "legacy"
    with torch.no_grad():
        assert _max_rel(net(x, sigma), theirs) > 1e-2


def test_a_wrong_or_incomplete_file_is_one_clear_error(tiny_bedroom, tmp_path):
    row, state, path = tiny_bedroom
    broken = dict(state)
    broken.pop("out.2.bias")
    broken["input_blocks.0.0.weight"] = broken["input_blocks.0.0.weight"][:8]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as info:
        load_network("tiny_bedroom", model_path=str(tmp_path / "broken.pt"))
    message = str(info.value)
    assert "missing: model.out.2.bias" in message and "model.input_blocks.0.0.weight" in message
    torch.save({"ema": state}, tmp_path / "wrapped.pt")
    with pytest.raises(ValueError, match="not a plain tensor dictionary"):
        load_network("tiny_bedroom", model_path=str(tmp_path / "wrapped.pt"))
    with pytest.raises(ValueError, match="pass its --dataset_name too"):
        load_network(model_path=path)


def test_real_configuration_matches_the_manifest():
    row = BACKBONES["lsun_bedroom"]
    assert (row.resolution, row.channels, row.label_dim, row.family) == (256, 3, 0, "state_dict")
    assert (row.sigma_min, row.sigma_max) == (0.006, 80.0)
    assert row.url == "https://openaipublic.blob.core.windows.net/consistency/edm_bedroom256_ema.pt"
    with torch.device("meta"):
        net = EDMPrecond(**row.interface_kwargs())
    ours = {k[len("model."):]: list(v.shape) for k, v in net.state_dict().items()}
    with gzip.open(MANIFEST, "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    manifest = {key: json.loads(shape) for key, shape, kind in rows}
    assert ours == manifest
    assert sum(int(np.prod(s)) for s in manifest.values()) == 526_304_771 == sum(p.numel() for p in net.parameters())


def test_step_layers_are_fresh_and_the_plain_teacher_ignores_them(tiny_bedroom):
    row, state, path = tiny_bedroom
    plain = load_network("tiny_bedroom", model_path=path).net
    stepped = load_network("tiny_bedroom", model_path=path, use_step_condition=True).net
    names = set(stepped.state_dict()) - set(plain.state_dict())
    assert "model.nfe_embed.0.weight" in names and "model.input_blocks.1.0.emb_nfe_layers.1.weight" in names
    x, sigma = torch.randn(2, 3, RES, RES), torch.tensor(2.0)
    with torch.no_grad():
        assert not torch.allclose(stepped(x, sigma, step_condition=4), stepped(x, sigma, step_condition=6), atol=1e-5)
        stepped.ignore_step_condition()
        assert torch.allclose(stepped(x, sigma, step_condition=4), plain(x, sigma), atol=1e-6)


def test_sfd_sfdv_and_second_stage_train_and_sample_end_to_end(tiny_bedroom, tmp_path, monkeypatch):
    import sample
    import train

    monkeypatch.chdir(tmp_path)  # train.py / sample.py use ./src and ./exps
    common = ["--dataset_name", "tiny_bedroom", "--batch", "2", "--total_kimg", "0.004", "--seed", "0",
              "--device", "cpu", "--sampler_tea", "dpmpp", "--M", "1"]
    for extra, expect in ((["--num_steps", "4"], "00000-tiny_bedroom-4-2-dpmpp-1-poly7.0-afs"),
                          (["--use_step_condition", "True"], "00001-tiny_bedroom-4-2-dpmpp-1-poly7.0-afs")):
        result = CliRunner().invoke(train.main, common + extra)
        assert result.exit_code == 0, result.output
        assert os.path.isdir(os.path.join("exps", expect)), os.listdir("exps")
    first = glob.glob("exps/00000-*/network-snapshot-*.safetensors")[0]
    net, settings = load_snapshot(first)
    assert settings["dataset_name"] == "tiny_bedroom" and net.model.__class__.__name__ == "OpenAIUNet"
    result = CliRunner().invoke(train.main, [
        "--dataset_name", "tiny_bedroom", "--is_second_stage", "True", "--model_path", first, "--num_steps", "3",
        "--M", "1", "--batch", "2", "--total_kimg", "0.002", "--lpips", "False", "--device", "cpu", "--seed", "0"])
    assert result.exit_code == 0, result.output

    teacher = ["--dataset_name", "tiny_bedroom", "--solver", "heun", "--num_steps", "3"]  # the teacher itself
    for exp, extra in (("0", []), ("1", ["--num_steps", "5"]), ("2", []), ("t", teacher)):
        out = f"out{exp}"
        where = ["--model_path", exp] if exp != "t" else []
        result = CliRunner().invoke(sample.main, [*where, "--seeds", "0-1", "--batch", "2", "--device", "cpu",
                                                  "--outdir", out, *extra])
        assert result.exit_code == 0, result.output
        image = np.asarray(PIL.Image.open(f"{out}/000000/000001.png"))
        assert image.shape == (RES, RES, 3) and image.std() > 0


def test_without_the_file_loading_fails_fast_naming_file_url_and_folder(tmp_path, monkeypatch):
    import train

    monkeypatch.setenv("SFD_OFFLINE", "1")
    row = BACKBONES["lsun_bedroom"]
    start = time.time()
    with pytest.raises(dnnlib.DownloadError) as info:
        load_network("lsun_bedroom", cache_root=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and time.time() - start < 10
    assert row.file_name in message and row.url in message and os.path.join(str(tmp_path), "lsun_bedroom") in message
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(train.main, ["--dataset_name", "lsun_bedroom", "--device", "cpu", "--batch", "2"])
    assert result.exit_code == 2 and row.url in result.output and "Traceback" not in result.output
    assert not os.path.exists("exps") or not os.listdir("exps")  # a failed load leaves no run folder


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_runs_the_convolutions_in_half_on_cuda_only_and_stays_close(tiny_bedroom, device):
    """use_fp16 on the OpenAI U-Net: float16 convolutions on CUDA, close to fp32; on a CPU the same calls stay
    float32 and give the fp32 result exactly."""
    row, state, path = tiny_bedroom
    net = load_network("tiny_bedroom", model_path=path, device=device).net
    x, sigma = torch.randn(4, 3, RES, RES, device=device), torch.tensor([0.01, 0.5, 5.0, 70.0], device=device)
    with torch.no_grad():
        full, full_dtypes = convolution_dtypes(lambda: net(x, sigma))
        net.use_fp16 = True
        half, half_dtypes = convolution_dtypes(lambda: net(x, sigma))
    assert half.dtype == torch.float32 and full_dtypes == {torch.float32}
    if device == "cuda":
        assert half_dtypes == {torch.float16} and 0 < _max_rel(half, full) < 1e-2
    else:
        assert half_dtypes == {torch.float32} and torch.equal(half, full)

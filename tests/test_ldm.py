"""LDM backbones (lsun_bedroom_ldm, ffhq_ldm): VP discrete preconditioning, the legacy U-Net, strict loading of
CompVis checkpoints (zip, EMA, separate vq-f4, Lightning pickles), offline errors, and a tiny SFD-v run
through train.py followed by sample.py writing decoded PNGs. All on CPU with toy-size models."""

import argparse
import glob
import math
import os
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from models import BACKBONES, load_network, load_snapshot
from models.latent.checkpoints import read_state_dict
from models.latent.checkpoints import alphas_cumprod_of
from models.latent.precond import LatentDiffusionPrecond
from models.unet import AttentionBlock
from tests.latent_tiny import (TINY_LDM, compvis_state, first_stage_compvis, reference_parts, tiny_row, write_ckpt,
                               write_zip)

REAL_LDM_SCHEDULE = dict(timesteps=1000, linear_start=0.0015, linear_end=0.0195)


def paper_sigma(t, alphas_cumprod):
    """The paper's sigma(t) (CFGPrecond): log alpha linear between knots t_k = k/1000, linear beyond the ends."""
    la = 0.5 * np.log(alphas_cumprod.astype(np.float64))
    knots = np.arange(1, len(la) + 1) / len(la)
    if t < knots[0]:
        value = la[0] + (t - knots[0]) * (la[1] - la[0]) / (knots[1] - knots[0])
    else:
        value = np.interp(t, knots, la)
    return math.sqrt(math.exp(-2 * value) - 1)


@pytest.fixture
def tiny_ldm_net():
    torch.manual_seed(0)
    return LatentDiffusionPrecond(config=TINY_LDM, sigma_min=0.006).eval()


def test_discrete_schedule_matches_the_paper_and_extrapolates_below_the_first_knot():
    net = LatentDiffusionPrecond(config=dict(TINY_LDM, schedule=REAL_LDM_SCHEDULE))
    ac = alphas_cumprod_of(REAL_LDM_SCHEDULE).numpy()
    assert net.sigma_max == pytest.approx(83.8225, abs=1e-4) == BACKBONES["ffhq_ldm"].sigma_max
    assert BACKBONES["lsun_bedroom_ldm"].sigma_max == BACKBONES["ffhq_ldm"].sigma_max
    assert float(net.sigma(1e-3)) == pytest.approx(0.03876, abs=1e-5)
    for t in (0.0004, 0.001, 0.0137, 0.5, 0.9995, 1.0):
        assert float(net.sigma(torch.tensor(t, dtype=torch.float64))) == pytest.approx(paper_sigma(t, ac), rel=1e-9)
    t = torch.linspace(2e-4, 1, 97, dtype=torch.float64)
    assert torch.allclose(net.sigma_inv(net.sigma(t)), t, rtol=1e-9, atol=1e-12)
    # sigma_min = 0.006 lies below sigma(1/1000): the timestep the U-Net sees is slightly negative (paper: ~ -0.97).
    c_noise = 1000 * float(net.sigma_inv(torch.tensor(0.006))) - 1
    assert -0.99 < c_noise < -0.95
    assert float(net.sigma(net.sigma_inv(torch.tensor(0.006)))) == pytest.approx(0.006, rel=1e-5)


def test_denoiser_is_eps_prediction_with_vp_scalings(tiny_ldm_net):
    net = tiny_ldm_net
    x, sigma = torch.randn(2, 3, 8, 8) * 5, torch.tensor([4.0, 0.2])
    with torch.no_grad():
        d = net(x, sigma)
        t = 1000 * net.sigma_inv(sigma) - 1
        eps = net.model.diffusion_model(x / (sigma ** 2 + 1).sqrt().reshape(-1, 1, 1, 1), t)
    assert torch.allclose(d, x - sigma.reshape(-1, 1, 1, 1) * eps, atol=1e-5)
    assert net.img_channels == 3 and net.img_resolution == 8 and net.label_dim == 0 and net.guidance_type == "uncond"


def test_legacy_attention_splits_fused_qkv_per_head():
    torch.manual_seed(1)
    block, heads, ch = AttentionBlock(64, num_heads=4), 4, 16
    x = torch.randn(2, 64, 5, 3)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x.reshape(2, 64, -1)))

        def attend(q, k, v):  # [B*H, ch, T] each, the released model's formula
            w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
            return torch.einsum("bts,bcs->bct", w, v).reshape(2, 64, -1)

        per_head = attend(*qkv.reshape(2 * heads, 3 * ch, -1).split(ch, dim=1))
        chunked = attend(*(t.reshape(2 * heads, ch, -1) for t in qkv.chunk(3, dim=1)))  # the wrong reading
        expected = (x.reshape(2, 64, -1) + block.proj_out(per_head)).reshape(x.shape)
        wrong = (x.reshape(2, 64, -1) + block.proj_out(chunked)).reshape(x.shape)
        out = block(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert (out - wrong).abs().max() > 1e-2


def _install(tmp_path, monkeypatch, name="tiny_ldm", **row_extra):
    row = tiny_row(name, TINY_LDM, **row_extra)
    monkeypatch.setitem(BACKBONES, name, row)
    return row, tmp_path / "src", tmp_path / "src" / name


@pytest.mark.parametrize("layout", ["zip+ema", "plain", "vq-f4-separate"])
def test_compvis_checkpoint_loads_strictly(tmp_path, monkeypatch, layout):
    row, cache, folder = _install(tmp_path, monkeypatch)
    parts, ema = reference_parts(TINY_LDM, seed=3), reference_parts(TINY_LDM, seed=4)
    state = compvis_state(TINY_LDM, parts, ema_parts=ema if layout == "zip+ema" else None,
                          with_first_stage=layout != "vq-f4-separate")
    if layout == "zip+ema":  # the release: model.ckpt inside the zip that the URL names
        folder.mkdir(parents=True)
        write_zip(folder / os.path.basename(row.url), write_ckpt(str(tmp_path / "staging" / "model.ckpt"), state))
    else:
        write_ckpt(str(folder / "model.ckpt"), state)
    if layout == "vq-f4-separate":  # the autoencoder from its own file, with its training-loss weights beside it
        vq = dict(first_stage_compvis(parts["first_stage"], TINY_LDM), **{"loss.discriminator.w": torch.ones(3)})
        write_ckpt(str(folder / "vq-f4" / "model.ckpt"), vq)

    loaded = load_network("tiny_ldm", cache_root=str(cache))
    net = loaded.net
    assert (folder / "model.ckpt").is_file() and not list(folder.glob("*.zip"))  # unzipped once, archive removed
    assert loaded.settings["model_source"] == "ldm" and loaded.settings["sigma_min"] == 0.006
    # EMA weights when the file has them (the weights LDM samples with), the plain ones otherwise.
    source = (ema if layout == "zip+ema" else parts)["unet"].state_dict()
    own = net.model.diffusion_model.state_dict()
    assert all(torch.equal(own[k], source[k]) for k in source)
    assert set(net.state_dict()) == {f"model.diffusion_model.{k}" for k in source} | {"alphas_cumprod"}
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # as LDM decodes: every latent vector snapped to its nearest codebook entry first
        codebook = parts["first_stage"].quantize.embedding.weight
        flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
        snapped = codebook[torch.cdist(flat, codebook).argmin(1)].reshape(2, 8, 8, 3).permute(0, 3, 1, 2)
        expected = parts["first_stage"].decode(snapped, force_not_quantize=True).sample.clamp(-1, 1)
    assert torch.allclose(net.decode_latents(z), expected, atol=1e-5)
    assert net.base["first_stage_checkpoint" if layout == "vq-f4-separate" else "checkpoint"].endswith("model.ckpt")
    assert net.decode_latents(z).shape == (2, 3, 16, 16)


def test_strict_loading_names_the_offending_keys(tmp_path, monkeypatch):
    _, cache, folder = _install(tmp_path, monkeypatch)
    parts = reference_parts(TINY_LDM, seed=5)
    good = compvis_state(TINY_LDM, parts)
    cases = {
        "unexpected": (dict(good, **{"cond_stage_model.bogus": torch.zeros(1)}), "cond_stage_model.bogus"),
        "missing": ({k: v for k, v in good.items() if k != "model.diffusion_model.out.2.bias"}, "out.2.bias"),
        "shape": (dict(good, **{"first_stage_model.quantize.embedding.weight": torch.zeros(8, 3)}),
                  "quantize.embedding.weight"),
        "schedule": (dict(good, alphas_cumprod=good["alphas_cumprod"] * 0.99), "alphas_cumprod"),
        "partial ema": (dict(good, **{"model_ema.diffusion_modelout2bias": torch.zeros(3)}), "EMA"),
    }
    for label, (state, needle) in cases.items():
        write_ckpt(str(folder / "model.ckpt"), state)
        with pytest.raises(ValueError, match=needle):
            load_network("tiny_ldm", cache_root=str(cache))


class _Payload:
    """Pickles as a call to os.system: loading must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_lightning_checkpoint_objects_are_read_inertly(tmp_path):
    marker = tmp_path / "code-ran"
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    path = write_ckpt(str(tmp_path / "model.ckpt"), tensors,
                      extra=dict(hyper_parameters=argparse.Namespace(lr=1.0), callbacks={"x": _Payload(marker)}))
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # what forces the fallback
    state = read_state_dict(path)
    assert list(state) == ["w"] and torch.equal(state["w"], tensors["w"])
    assert not marker.exists()


def test_step_layers_start_fresh_and_the_teacher_skips_them(tmp_path, monkeypatch):
    _, cache, folder = _install(tmp_path, monkeypatch)
    parts = reference_parts(TINY_LDM, seed=6)
    write_ckpt(str(folder / "model.ckpt"), compvis_state(TINY_LDM, parts))
    plain = load_network("tiny_ldm", cache_root=str(cache)).net
    # --model_path with a latent --dataset_name: any CompVis file of that configuration, wherever it lies.
    moved = write_ckpt(str(tmp_path / "elsewhere" / "my.ckpt"), compvis_state(TINY_LDM, parts))
    assert torch.equal(load_network("tiny_ldm", model_path=moved, cache_root=str(tmp_path / "none")).net.state_dict()
                       ["model.diffusion_model.out.2.weight"], plain.state_dict()["model.diffusion_model.out.2.weight"])
    stepped = load_network("tiny_ldm", cache_root=str(cache), use_step_condition=True).net
    names = [k for k in stepped.state_dict() if "nfe" in k]
    assert "model.diffusion_model.nfe_embed.0.weight" in names
    assert "model.diffusion_model.input_blocks.1.0.emb_nfe_layers.1.weight" in names
    x, s = torch.randn(1, 3, 8, 8), torch.tensor(2.0)
    with torch.no_grad():
        assert not torch.allclose(stepped(x, s, step_condition=4), plain(x, s), atol=1e-4)
        assert not torch.allclose(stepped(x, s, step_condition=4), stepped(x, s, step_condition=6), atol=1e-5)
        stepped.ignore_step_condition()
        assert torch.allclose(stepped(x, s, step_condition=4), plain(x, s), atol=1e-6)


@pytest.mark.parametrize("name,archive", [("lsun_bedroom_ldm", "lsun_bedrooms.zip"), ("ffhq_ldm", "ffhq.zip")])
def test_without_weights_each_ldm_fails_fast_naming_file_url_and_folder(tmp_path, name, archive):
    start = time.time()
    with pytest.raises(dnnlib.DownloadError) as err:
        load_network(name, cache_root=str(tmp_path))
    message = str(err.value)
    assert time.time() - start < 5 and "\n" not in message
    assert "model.ckpt" in message and archive in message
    assert f"https://ommer-lab.com/files/latent-diffusion/{archive}" in message
    assert os.path.join(str(tmp_path), name) in message


def test_sfdv_training_and_sampling_end_to_end(tmp_path, monkeypatch):
    import sample
    import train

    _install(tmp_path, monkeypatch)
    parts = reference_parts(TINY_LDM, seed=7)
    write_ckpt(str(tmp_path / "src" / "tiny_ldm" / "model.ckpt"), compvis_state(TINY_LDM, parts))
    monkeypatch.chdir(tmp_path)  # train.py / sample.py use ./src and ./exps
    result = CliRunner().invoke(train.main, [
        "--dataset_name", "tiny_ldm", "--batch", "2", "--total_kimg", "0.004", "--seed", "0", "--device", "cpu",
        "--schedule_type", "discrete", "--schedule_rho", "1", "--sampler_tea", "euler", "--M", "1",
        "--use_step_condition", "True", "--guidance_type", "uncond"])
    assert result.exit_code == 0, result.output
    run = glob.glob("exps/00000-tiny_ldm-4-2-euler-1-discrete1.0-afs")
    assert run, os.listdir("exps")
    snap = glob.glob(os.path.join(run[0], "network-snapshot-*.safetensors"))[0]
    net, settings = load_snapshot(snap)
    assert settings["model_source"] == "ldm" and settings["schedule_type"] == "discrete"
    assert settings["guidance_type"] == "uncond" and settings["use_step_condition"] is True
    # Only the U-Net (and its schedule) is in the snapshot; the frozen autoencoder comes from the base file.
    assert all(k.startswith("model.diffusion_model.") or k == "alphas_cumprod" for k in net.state_dict())
    assert net.base["checkpoint"] == str(tmp_path / "src" / "tiny_ldm" / "model.ckpt")
    trained = net.model.diffusion_model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in parts["unet"].state_dict().items())

    result = CliRunner().invoke(sample.main, ["--model_path", "0", "--seeds", "0-2", "--batch", "2", "--num_steps", "5",
                                              "--device", "cpu", "--outdir", "out"])
    assert result.exit_code == 0, result.output
    pngs = sorted(glob.glob("out/000000/*.png"))
    assert [os.path.basename(p) for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    image = np.asarray(PIL.Image.open(pngs[0]))
    assert image.shape == (16, 16, 3) and image.std() > 0


def test_a_legacy_non_zip_compvis_ckpt_given_as_model_path_loads(tmp_path, monkeypatch):
    _, cache, folder = _install(tmp_path, monkeypatch)
    parts = reference_parts(TINY_LDM, seed=7)
    legacy = str(tmp_path / "elsewhere" / "old.ckpt")
    os.makedirs(os.path.dirname(legacy))
    torch.save({"state_dict": compvis_state(TINY_LDM, parts), "global_step": 1}, legacy,
               _use_new_zipfile_serialization=False)
    net = load_network("tiny_ldm", model_path=legacy, cache_root=str(cache)).net
    expected = compvis_state(TINY_LDM, parts)["model.diffusion_model.out.2.weight"]
    assert torch.equal(net.state_dict()["model.diffusion_model.out.2.weight"], expected)


def test_loader_gives_the_ema_weights_and_keeps_the_live_ones_for_the_student(tmp_path, monkeypatch):
    """The loader's network holds the EMA weights (the ones LDM samples with); the live ones travel beside it for
    the student, which the loop starts from them (tests/test_loop_behaviour.py)."""
    _install(tmp_path, monkeypatch)
    live, ema = reference_parts(TINY_LDM, seed=8), reference_parts(TINY_LDM, seed=9)
    write_ckpt(str(tmp_path / "src" / "tiny_ldm" / "model.ckpt"), compvis_state(TINY_LDM, live, ema_parts=ema))
    loaded = load_network("tiny_ldm", cache_root=str(tmp_path / "src"))
    unet = loaded.net.model.diffusion_model.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in ema["unet"].state_dict().items())
    found, _ = loaded.student_unet
    assert all(torch.equal(found[k], v) for k, v in live["unet"].state_dict().items())
    assert not torch.equal(unet["out.2.weight"], found["out.2.weight"])

"""Distil a diffusers pipeline and hand the student back to diffusers (issue 53): a tiny SFD run (train.py
--model_path=PIPELINE_DIR) from a pixel DDPM pipeline and from an SD-2-style v-prediction pipeline, sample.py on the
snapshot, export.py to a pipeline folder, and DiffusionPipeline.from_pretrained sampling it with stock classes at the
student's NFE: the same images as sample.py for the same seeds. Also: SFD-v from both pipelines (sampled at 4 and 7
steps, refused by export.py) and SFD from a class-conditional pixel pipeline."""

import glob
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import export
import sample
import train
from models import load_network, save_snapshot
from tests.conftest import assert_one_line_refusal
from tests.diffusers_tiny import write_pixel_pipeline, write_sd_pipeline
from tests.latent_tiny import write_captions

SEEDS = [0, 1]
NUM_STEPS = 4


def distil(workdir, pipeline, *extra):
    """A tiny SFD run (2 trajectories) from a pipeline folder; returns its snapshot."""
    os.chdir(workdir)
    result = CliRunner().invoke(train.main, ["--model_path", pipeline, "--batch", "2", "--total_kimg", "0.002",
                                             "--seed", "0", "--device", "cpu", "--M", "1", "--num_steps",
                                             str(NUM_STEPS), "--afs", "False", *extra])
    assert result.exit_code == 0, result.output
    (snapshot,) = glob.glob(os.path.join(workdir, "exps", "*", "network-snapshot-*.safetensors"))
    return snapshot


def pngs(folder):
    return np.stack([np.asarray(PIL.Image.open(os.path.join(folder, "000000", f"{s:06d}.png"))) for s in SEEDS])


def to_uint8(images01):
    """diffusers' numpy_to_pil rounding of [0, 1] images."""
    return (images01.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8).squeeze(-1 if images01.shape[1] == 1
                                                                                           else None)


def distil_students(root, seed, *extra, with_classes=False):
    """Tiny runs (`distil`, with `extra` options) from a pixel DDPM and an SD-2-style pipeline written under root, and
    with_classes a plain SFD run from a class-conditional pixel one; their snapshots by kind. Keeps the cwd."""
    cwd = os.getcwd()
    try:
        return _distil_students(root, seed, extra, with_classes)
    finally:
        os.chdir(cwd)


def _distil_students(root, seed, extra, with_classes):
    pixel = write_pixel_pipeline(str(root / "ddpm"), "epsilon", seed=seed)
    sd2 = write_sd_pipeline(str(root / "sd2"), "v_prediction", seed=seed + 2)
    captions = write_captions(str(root / "captions.csv"))
    for name in ("p", "t", "c"):
        os.makedirs(root / name)
    found = dict(pixel=distil(str(root / "p"), pixel, *extra),
                 text=distil(str(root / "t"), sd2, *extra, "--guidance_type", "cfg", "--guidance_rate", "3",
                             "--captions", captions),
                 root=root)
    if with_classes:
        classes = write_pixel_pipeline(str(root / "classes"), "epsilon", seed=seed + 4, num_class_embeds=3)
        found["classes"] = distil(str(root / "c"), classes)
    return found


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    return distil_students(tmp_path_factory.mktemp("export"), 7)


@pytest.mark.parametrize("kind", ["pixel", "text"])
def test_exported_student_samples_in_stock_diffusers_as_sample_py(students, kind, tmp_path, monkeypatch):
    import diffusers

    monkeypatch.chdir(tmp_path)
    snapshot = students[kind]
    prompt = ["--prompt", "the cat"] if kind == "text" else []
    result = CliRunner().invoke(sample.main, ["--model_path", snapshot, "--seeds", "0-1", "--device", "cpu",
                                              "--outdir", "ours", *prompt])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(export.main, ["--model_path", snapshot, "--outdir", "exported"])
    assert result.exit_code == 0, result.output
    record = json.load(open("exported/sfd_export.json"))
    assert record["num_inference_steps"] == NUM_STEPS - 1 and not record["afs_in_student"]
    assert not glob.glob("exported/**/*.py", recursive=True)  # configs and weights only

    pipe = diffusers.DiffusionPipeline.from_pretrained("exported")
    assert type(pipe).__name__ == ("StableDiffusionPipeline" if kind == "text" else "ConsistencyModelPipeline")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    calls = dict(num_inference_steps=record["num_inference_steps"], generator=generators, output_type="pt")
    if kind == "text":
        calls.update(prompt=["the cat"] * len(SEEDS), guidance_scale=record["guidance_scale"])
    else:
        calls.update(batch_size=len(SEEDS))
    with torch.no_grad():
        theirs = pipe(**calls).images

    # The student's own time points and images, float for float.
    loaded = load_network(model_path=snapshot)
    net, st = loaded.net, loaded.settings
    import solvers

    t_steps = solvers.get_schedule(NUM_STEPS, st["sigma_min"], st["sigma_max"], schedule_type=st["schedule_type"],
                                   schedule_rho=st["schedule_rho"])
    assert torch.allclose(pipe.scheduler.sigmas, t_steps, rtol=1e-6, atol=0)
    latents = torch.stack([torch.randn(theirs.shape[1:] if kind == "pixel" else (4, 8, 8),
                                       generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    condition = None
    if kind == "text":
        net.guidance_rate = st["guidance_rate"]
        condition = net.encode_prompts(["the cat"] * len(SEEDS))
    with torch.no_grad():
        x = solvers.euler_sampler(net, latents, num_steps=NUM_STEPS, sigma_min=st["sigma_min"],
                                  sigma_max=st["sigma_max"], schedule_type=st["schedule_type"],
                                  schedule_rho=st["schedule_rho"], afs=False,
                                  **(dict(condition=condition[0], unconditional_condition=condition[1])
                                     if condition else {}))
        ours = ((net.decode_latents(x) if kind == "text" else x.clamp(-1, 1)) + 1) / 2
    # float32 rounding relative to the sample's scale (an untrained tiny U-Net's samples reach |x| ~ 600)
    diff, scale = (ours - theirs).abs().max().item(), max(1.0, x.abs().max().item())
    print(f"{kind}: exported pipeline vs our sampler, max abs difference {diff:.2e} (images in [0, 1]), "
          f"{diff / scale:.1e} relative to max |x| {scale:.3g}")
    assert diff < 3e-6 * scale
    # sample.py's PNGs: the same pixels up to the rounding of values that fall on a .5 boundary.
    mine, stock = pngs("ours").astype(int), to_uint8(theirs).astype(int)
    assert np.abs(mine - stock).max() <= 1 and (mine != stock).mean() < 0.01


def test_afs_student_exports_with_afs_off(students, tmp_path, monkeypatch):
    """AFS has no stock scheduler form: the export runs the first step through the network and says so."""
    monkeypatch.chdir(tmp_path)
    loaded = load_network(model_path=students["pixel"])
    save_snapshot("afs.safetensors", loaded.net, dict(loaded.settings, afs=True))
    result = CliRunner().invoke(export.main, ["--model_path", "afs.safetensors", "--outdir", "exported"])
    assert result.exit_code == 0, result.output
    assert "AFS has no stock scheduler form" in result.output and "NFE 3 instead of 2" in result.output
    assert json.load(open("exported/sfd_export.json"))["afs_in_export"] is False


def test_export_refuses_what_it_cannot_express(students, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = load_network(model_path=students["pixel"])
    save_snapshot("uni.safetensors", loaded.net, dict(loaded.settings, schedule_type="time_uniform"))
    result = CliRunner().invoke(export.main, ["--model_path", "uni.safetensors", "--outdir", "a"])
    assert_one_line_refusal(result, "schedule_type=time_uniform", "no stock diffusers form")
    save_snapshot("pre.safetensors", loaded.net, {k: v for k, v in loaded.settings.items() if k != "num_steps"})
    result = CliRunner().invoke(export.main, ["--model_path", "pre.safetensors", "--outdir", "b"])
    assert_one_line_refusal(result, "not a distilled student")
    assert not os.path.exists("a") and not os.path.exists("b")


@pytest.fixture(scope="module")
def sfdv_students(tmp_path_factory):
    """Tiny SFD-v runs (step embedding = diffusers' class_embed_type="timestep") from a pixel and an SD-2-style
    pipeline, and a plain SFD run from a class-conditional pixel pipeline (num_class_embeds)."""
    return distil_students(tmp_path_factory.mktemp("sfdv"), 11, "--use_step_condition", "True", with_classes=True)


@pytest.mark.parametrize("kind", ["pixel", "text"])
def test_sfdv_student_of_a_pipeline_samples_at_4_and_7_steps(sfdv_students, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snapshot = sfdv_students[kind]
    loaded = load_network(model_path=snapshot)
    st = loaded.settings
    assert st["use_step_condition"] and st["step_condition_range"] == [4, 7] and loaded.net.use_step_condition
    assert loaded.net.unet.config.class_embed_type == "timestep"
    prompt = ["--prompt", "the cat"] if kind == "text" else []
    images = {}
    for steps in (4, 7):
        result = CliRunner().invoke(sample.main, ["--model_path", snapshot, "--seeds", "0-1", "--device", "cpu",
                                                  "--num_steps", str(steps), "--outdir", f"k{steps}", *prompt])
        assert result.exit_code == 0, result.output
        images[steps] = pngs(f"k{steps}")
    assert (images[4] != images[7]).any()
    # export.py takes SFD students only
    result = CliRunner().invoke(export.main, ["--model_path", snapshot, "--outdir", "exported"])
    assert_one_line_refusal(result, "step-conditioned (SFD-v)", "export takes SFD students only")
    assert not os.path.exists("exported")


def test_class_conditional_pipeline_distils_and_samples(sfdv_students, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = load_network(model_path=sfdv_students["classes"])
    assert loaded.net.label_dim == 3 and not loaded.settings["use_step_condition"]
    result = CliRunner().invoke(sample.main, ["--model_path", sfdv_students["classes"], "--seeds", "0-1",
                                              "--device", "cpu", "--outdir", "out"])
    assert result.exit_code == 0, result.output
    images = pngs("out")
    assert images.shape == (2, 8, 8, 3) and images.std() > 0

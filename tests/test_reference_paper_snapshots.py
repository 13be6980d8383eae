"""Snapshots written by the paper's own training loop (tests/data/reference/paper-snapshot): their settings come out
of the file, the denoiser matches the paper's network, and our sample.py draws the images the paper's sample.py drew.

Tolerances (tests/data/reference/README.md §2): denoiser and float images within 1e-4 * max|expected| (float32
rounding only); PNG bytes within 1 where a value sits on a rounding edge.
"""

import glob
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import solvers
from models import load_network
from models.edm import is_step_layer_key
from models.loader import _paper_architecture
from torch_utils import persistence

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference")
SNAP = os.path.join(REF, "paper-snapshot")
REL_TOL = 1e-4

# The teacher both runs distilled: pickle (a)'s architecture, not the cifar10 preset the dataset_name names.
ARCH_A = dict(model_type="SongUNet", img_resolution=8, img_channels=3, label_dim=0, model_channels=8,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.0,
              embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
              resample_filter=[1, 1])


def assert_close_rel(got, expected, what, tol=REL_TOL):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    err, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    assert err <= tol * scale, f"{what}: max|got - expected| = {err:.3e} > {tol:g} * max|expected| ({scale:.3e})"


def snapshot(run):
    return os.path.join(SNAP, f"{run}-network-snapshot-000001.pkl")


@pytest.fixture(scope="module")
def outputs():
    return np.load(os.path.join(SNAP, "snapshot-outputs.npz"))


@pytest.mark.parametrize("run", ["sfd", "sfdv"])
def test_settings_and_architecture_come_out_of_the_file(run):
    loaded = load_network(model_path=snapshot(run))
    st = loaded.settings
    assert loaded.source == "paper_snapshot" and loaded.dataset_name == "cifar10"
    assert (st["num_steps"], st["afs"], st["schedule_type"], st["schedule_rho"]) == (4, True, "polynomial", 7.0)
    assert (st["sigma_min"], st["sigma_max"]) == (0.006, 80.0)
    assert st["use_step_condition"] is (run == "sfdv") and st["is_second_stage"] is False
    assert (st["sampler_tea"], st["M"], st["max_order"]) == ("dpmpp", 3, 3)
    if run == "sfdv":
        assert st["step_condition_range"] == [4, 7]
    kwargs = loaded.net.init_kwargs
    assert {k: kwargs[k] for k in ARCH_A} == ARCH_A
    assert (loaded.net.sigma_min, loaded.net.sigma_max, loaded.net.sigma_data) == (0.006, 80.0, 0.5)


@pytest.mark.parametrize("run", ["sfd", "sfdv"])
def test_every_tensor_loads_strictly(run):
    recorded = persistence.record_tensors(persistence.load_edm_pickle(snapshot(run))["model"])
    assert len(recorded) == 171
    ours = load_network(model_path=snapshot(run)).net.state_dict()
    # The paper's classes always carry the step layers; an SFD run never used them, so we drop them there.
    expected = recorded if run == "sfdv" else {k: v for k, v in recorded.items() if not is_step_layer_key(k)}
    assert sorted(ours) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name


def test_sfd_denoiser_matches_the_papers(outputs):
    net = load_network(model_path=snapshot("sfd")).net
    x, sigma = torch.from_numpy(outputs["x"]), torch.from_numpy(outputs["sigma"])
    with torch.no_grad():
        assert_close_rel(net(x, sigma), outputs["sfd.D"], "sfd D(x, sigma)")


@pytest.mark.parametrize("k", [4, 5, 6, 7])
def test_sfdv_denoiser_matches_the_papers_at_every_step_condition(outputs, k):
    net = load_network(model_path=snapshot("sfdv")).net
    x, sigma = torch.from_numpy(outputs["x"]), torch.from_numpy(outputs["sigma"])
    with torch.no_grad():
        assert_close_rel(net(x, sigma, step_condition=k), outputs[f"sfdv.D_step_condition_{k}"],
                         f"sfdv D(x, sigma, step_condition={k})")


def test_sfdv_without_step_condition_is_the_network_without_its_step_path(outputs):
    """The paper's network skips the step layers when step_condition is None. Ours refuses a missing step condition
    (an SFD-v model sampled without one is a bug), and `ignore_step_condition()` is that same plain path."""
    net = load_network(model_path=snapshot("sfdv")).net
    x, sigma = torch.from_numpy(outputs["x"]), torch.from_numpy(outputs["sigma"])
    with pytest.raises(ValueError, match="step_condition"):
        net(x, sigma)
    with torch.no_grad():
        assert_close_rel(net.ignore_step_condition()(x, sigma), outputs["sfdv.D"], "sfdv D(x, sigma), no step path")


# What the paper's sample.py passed to its euler_sampler (README §2), per run and --num_steps.
SAMPLE_RUNS = [("sfd", 4, None, 2), ("sfdv", 4, 4, 2), ("sfdv", 6, 6, 4)]


@pytest.mark.parametrize("run, num_steps, step_condition, nfe", SAMPLE_RUNS)
def test_sample_py_draws_the_papers_images(tmp_path, monkeypatch, outputs, run, num_steps, step_condition, nfe):
    import sample

    calls = []
    real = solvers.SOLVERS["euler"]

    def recording(net, latents, **kwargs):
        images = real(net, latents, **kwargs)
        calls.append(dict(kwargs, latents=latents.clone(), images=images.clone()))
        return images

    monkeypatch.setitem(solvers.SOLVERS, "euler", recording)
    out = tmp_path / "out"
    r = CliRunner().invoke(sample.main, ["--model_path", snapshot(run), "--seeds", "5000-5003", "--batch", "4",
                                         "--num_steps", str(num_steps), "--outdir", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"NFE {nfe}" in r.output
    assert len(calls) == 1
    call = calls[0]
    # The settings sample.py took from the file, as the paper's sample.py passed them.
    assert (call["num_steps"], call["afs"], call["schedule_type"], call["schedule_rho"]) == (num_steps, True,
                                                                                              "polynomial", 7.0)
    assert (call["sigma_min"], call["sigma_max"]) == (0.006, 80.0)
    assert call["step_condition"] == step_condition

    prefix = f"sample.{run}.num_steps{num_steps}"
    assert torch.equal(call["latents"], torch.from_numpy(outputs[f"{prefix}.latents"]))  # same per-seed generators
    assert_close_rel(call["images"], outputs[f"{prefix}.images"], f"{prefix} images")
    files = sorted(glob.glob(str(out / "*" / "*.png")))
    assert [os.path.basename(f) for f in files] == [f"{s:06d}.png" for s in range(5000, 5004)]
    png = np.stack([np.asarray(PIL.Image.open(f)) for f in files]).astype(np.int64)
    diff = np.abs(png - outputs[f"{prefix}.images_uint8"].astype(np.int64))
    assert diff.max() <= 1, f"{prefix}: PNG values differ by up to {diff.max()} (allowed: 1 on rounding edges)"


@pytest.mark.parametrize("stem", ["ddpmpp-uncond-edm-8x8", "ncsnpp-uncond-vp-8x8-gray", "adm-cond10-edm-12x12"])
def test_architecture_is_read_off_the_module_tree(stem):
    """The paper's pickles record modules, not constructor keywords; the loader reads the architecture off the
    module tree. EDM's pickles hold the same tree AND the keywords, so every EDM family checks the reading."""
    record = persistence.load_edm_pickle(os.path.join(REF, "edm-pickles", stem + ".pkl"))["ema"]
    arch = _paper_architecture(record, persistence.record_tensors(record), stem)
    recorded = record.init_kwargs
    # attn_resolutions leaves no trace where no block has heads (ADM below 64 channels): the networks are equal.
    widest = max(recorded["channel_mult"]) * recorded["model_channels"]
    no_heads = recorded["model_type"] == "DhariwalUNet" and widest < 64
    for key, value in recorded.items():
        if key in ("use_fp16",) or (key == "attn_resolutions" and no_heads):
            continue
        assert arch.get(key) == value, (key, arch.get(key), value)

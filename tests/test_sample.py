"""sample.py: determinism across batch sizes and processes, output layouts, experiment lookup, in-process FID."""

import glob
import hashlib
import math
import os
import subprocess
import sys

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sample
from models import save_snapshot
from tests.conftest import ROOT, assert_one_line_refusal, build_tiny_edm, tree
from torch_utils import cli

SETTINGS = dict(dataset_name="tiny", model_source="edm", num_steps=4, M=3, afs=True, schedule_type="polynomial",
                schedule_rho=7.0, sigma_min=0.006, sigma_max=80.0, use_step_condition=False, sampler_tea="dpmpp",
                max_order=3, predict_x0=True, lower_order_final=True, is_second_stage=False, guidance_type=None,
                guidance_rate=0.0)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("exps")
    run = root / "00003-tiny-4-2-dpmpp-3-poly7.0-afs"
    run.mkdir()
    net = build_tiny_edm(seed=0)
    for kimg in (5, 20, 10):  # the latest is 20, whatever the write order
        torch.manual_seed(kimg)
        for p in net.parameters():
            p.data.add_(0.01 * torch.randn_like(p))
        save_snapshot(str(run / f"network-snapshot-{kimg:06d}.safetensors"), net, SETTINGS)
    return root, run


def cond_snapshot(tmp_path):
    from tests.conftest import TINY_DHARIWAL

    net = build_tiny_edm(seed=2, **TINY_DHARIWAL)
    path = tmp_path / "cond.safetensors"
    save_snapshot(str(path), net, dict(SETTINGS, dataset_name="tinycond"))
    return str(path)


def run_sample(*args):
    return CliRunner().invoke(sample.main, ["--device", "cpu", *args])


def digests(folder):
    return {os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(str(folder), "**", "*.png"), recursive=True)}


@pytest.mark.parametrize("bad, message", [
    ("a", "'a' is not a number or a range like 0-99"),
    ("5-2", "range '5-2' runs backwards"),
    ("1,,2", "'' is not a number or a range like 0-99"),
])
def test_parse_int_list(bad, message):
    assert cli.parse_int_list("1,2,5-8") == [1, 2, 5, 6, 7, 8]
    with pytest.raises(click.BadParameter) as info:
        cli.parse_int_list(bad)
    assert info.value.message == message
    r = run_sample("--seeds", bad)  # the command line: a usage error (exit code 2) on one line, nothing sampled
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == f"Error: Invalid value for --seeds: {message}"
    assert "Traceback" not in r.output


def record_network_calls(monkeypatch):
    """Every call of an EDM-family network (sigma, step_condition), whatever loaded it."""
    from models.precond import _Precond

    calls = []
    real = _Precond.forward

    def recording(self, x, sigma, *args, step_condition=None, **kwargs):
        calls.append((float(torch.as_tensor(sigma).reshape(-1)[0]), step_condition))
        return real(self, x, sigma, *args, step_condition=step_condition, **kwargs)

    monkeypatch.setattr(_Precond, "forward", recording)
    return calls


def edm_time_points(num_steps, sigma_min, sigma_max, rho):
    """EDM eq. 5: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (num_steps - 1) * (b - a)) ** rho for i in range(num_steps)]


@pytest.mark.parametrize("rho", [3.0, 11.0])
def test_snapshot_schedule_rho_reaches_the_sampler(tmp_path, monkeypatch, rho):
    path = tmp_path / "snap.safetensors"
    save_snapshot(str(path), build_tiny_edm(seed=0), dict(SETTINGS, num_steps=5, schedule_rho=rho))
    calls = record_network_calls(monkeypatch)
    r = run_sample("--model_path", str(path), "--seeds", "0-1", "--outdir", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    # Euler with AFS over 5 points: network calls at t_1, t_2, t_3 of the snapshot's own schedule.
    expected = edm_time_points(5, SETTINGS["sigma_min"], SETTINGS["sigma_max"], rho)[1:4]
    assert [sigma for sigma, _ in calls] == pytest.approx(expected, rel=1e-6)
    assert [sigma for sigma, _ in calls] != pytest.approx(edm_time_points(5, 0.006, 80.0, 7.0)[1:4], rel=1e-3)


class LabelRecordingNet:
    """A class-conditional stand-in network: records the first input and the labels it receives; D(x) = x/2."""

    img_channels, img_resolution, label_dim = 2, 4, 10

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, class_labels=None, **conditions):
        self.calls.append((x.clone(), torch.as_tensor(sigma).clone(), class_labels))
        return 0.5 * x


def edm_latents_and_labels(seeds, shape, label_dim):
    """EDM's generate.py: one torch.Generator per seed (seed mod 2^32); per seed the latent [C, H, W] is drawn
    first, then the class index (randint with an empty size); labels are one-hot rows of eye(label_dim)."""
    latents, labels = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed % (1 << 32))
        latents.append(torch.randn(shape, generator=g))
        labels.append(int(torch.randint(label_dim, size=[], generator=g)))
    return torch.stack(latents), torch.eye(label_dim)[labels]


def test_each_seed_draws_its_latent_then_its_class_label():
    import dnnlib

    seeds = [0, 1, 7, 123456, (1 << 32) + 5]
    net = LabelRecordingNet()
    cfg = dnnlib.EasyDict(solver="euler", num_steps=3, sigma_min=0.1, sigma_max=10.0, schedule_type="polynomial",
                          schedule_rho=7.0, afs=False, step_condition=None, options={})
    sample.generate(net, cfg, seeds, torch.device("cpu"))
    x_first, sigma_first, labels = net.calls[0]
    latents, expected_labels = edm_latents_and_labels(seeds, [2, 4, 4], 10)
    torch.testing.assert_close(x_first, latents * sigma_first, rtol=0, atol=0)
    torch.testing.assert_close(labels, expected_labels, rtol=0, atol=0)
    assert all(c[2] is labels for c in net.calls)
    assert len(set(labels.argmax(1).tolist())) > 2  # the seeds draw different classes


def test_sample_py_feeds_a_class_conditional_model_edms_latents_and_labels(tmp_path, monkeypatch):
    from models.precond import _Precond

    snap = cond_snapshot(tmp_path)
    seen = []
    real = _Precond.forward

    def recording(self, x, sigma, class_labels=None, *args, **kwargs):
        seen.append((x.clone(), float(torch.as_tensor(sigma).reshape(-1)[0]), class_labels.clone()))
        return real(self, x, sigma, class_labels, *args, **kwargs)

    monkeypatch.setattr(_Precond, "forward", recording)
    r = run_sample("--model_path", snap, "--seeds", "11-16", "--batch", "6", "--outdir", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    latents, labels = edm_latents_and_labels(range(11, 17), [3, 8, 8], 4)
    x, sigma, got_labels = seen[0]  # AFS snapshot: the first call is at t_1, after the analytical step
    t0 = SETTINGS["sigma_max"]
    x0 = latents * torch.tensor(t0, dtype=torch.float32)
    torch.testing.assert_close(x, x0 + (sigma - t0) * x0 / math.sqrt(1 + t0 ** 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_labels, labels, rtol=0, atol=0)


def edm_uint8(x):
    """EDM's conversion in float32: (x·127.5 + 128), clipped to [0, 255], truncated to uint8 (numpy's IEEE float32
    ops, independently of torch)."""
    y = np.asarray(x, dtype=np.float32) * np.float32(127.5) + np.float32(128)
    return np.clip(y, 0, 255).astype(np.uint8)


# Exact values, both ends, out of range, then every x = k/255: x·127.5 + 128 lands on (or within float32 rounding of)
# an integer for even k and a half for odd k, where truncation and rounding to nearest part.
EDGE_VALUES = np.concatenate([
    [-1.0, 0.0, 1.0, 0.5, -0.5, 1 / 255, 3 / 255, -1 / 255, 253 / 255, -253 / 255, 2.0, -2.0, 1.01, -1.01, 1e6, -1e6],
    np.arange(-256, 257) / 255,
]).astype(np.float32)


def test_uint8_conversion_rounds_like_edm():
    got = sample.to_uint8(torch.from_numpy(EDGE_VALUES))
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), edm_uint8(EDGE_VALUES))
    # Read off EDM's formula by hand: truncation after +128, never rounding to nearest.
    assert got[:11].tolist() == [0, 128, 255, 191, 64, 128, 129, 127, 254, 1, 255]
    assert got[11:16].tolist() == [0, 255, 0, 255, 0]


def test_pngs_hold_edm_uint8_of_the_generated_images(snapshot, tmp_path, monkeypatch):
    _, run = snapshot
    images = torch.from_numpy(EDGE_VALUES[:128].reshape(2, 1, 8, 8))
    monkeypatch.setattr(sample, "generate", lambda net, cfg, seeds, device, prompts=None: images[:len(seeds)])
    r = run_sample("--model_path", str(run / "network-snapshot-000005.safetensors"), "--seeds", "0-1", "--batch", "2",
                   "--subdirs", "False", "--outdir", str(tmp_path))
    assert r.exit_code == 0, r.output
    import PIL.Image

    for k in range(2):
        png = np.asarray(PIL.Image.open(tmp_path / f"{k:06d}.png"))
        np.testing.assert_array_equal(png, edm_uint8(images[k, 0].numpy()))


def test_png_of_a_seed_does_not_depend_on_batch_size(snapshot, tmp_path):
    _, run = snapshot
    snap = str(run / "network-snapshot-000020.safetensors")
    results = {}
    for batch in (1, 3, 8):
        out = tmp_path / f"b{batch}"
        r = run_sample("--model_path", snap, "--seeds", "0-9", "--batch", str(batch), "--outdir", str(out))
        assert r.exit_code == 0, r.output
        results[batch] = digests(out)
    assert len(results[1]) == 10 and sorted(results[1])[0] == os.path.join("000000", "000000.png")
    assert results[1] == results[3] == results[8]


def test_class_conditional_labels_come_from_the_seed(tmp_path):
    snap = cond_snapshot(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_sample("--model_path", snap, "--seeds", "3-7", "--batch", "5", "--outdir", str(a)).exit_code == 0
    assert run_sample("--model_path", snap, "--seeds", "5,3-4", "--batch", "1", "--outdir", str(b)).exit_code == 0
    da, db = digests(a), digests(b)
    assert {k: da[k] for k in db} == db


def test_experiment_number_picks_latest_snapshot_and_default_outdir(snapshot, tmp_path, monkeypatch):
    root, run = snapshot
    monkeypatch.chdir(tmp_path)
    r = run_sample("--model_path", "3", "--exps_dir", str(root), "--seeds", "0-1")
    assert r.exit_code == 0, r.output
    assert "network-snapshot-000020" in r.output
    assert sorted(digests(tmp_path / "samples" / "tiny" / "euler_step4_nfe2")) == [
        os.path.join("000000", "000000.png"), os.path.join("000000", "000001.png")]
    r = run_sample("--model_path", str(run), "--seeds", "0", "--outdir", str(tmp_path / "by-folder"))
    assert r.exit_code == 0 and "network-snapshot-000020" in r.output, r.output
    r = run_sample("--model_path", "7", "--exps_dir", str(root))
    assert r.exit_code == 2 and "00007" in r.output


def test_subdirs_and_grid_layouts(snapshot, tmp_path):
    _, run = snapshot
    snap = str(run / "network-snapshot-000005.safetensors")
    r = run_sample("--model_path", snap, "--seeds", "998-1001", "--outdir", str(tmp_path / "sub"))
    assert r.exit_code == 0, r.output
    assert sorted(digests(tmp_path / "sub")) == [os.path.join("000000", "000998.png"),
                                                os.path.join("000000", "000999.png"),
                                                os.path.join("001000", "001000.png"),
                                                os.path.join("001000", "001001.png")]
    r = run_sample("--model_path", snap, "--seeds", "998-1001", "--subdirs", "False", "--outdir", str(tmp_path / "flat"))
    assert r.exit_code == 0 and sorted(digests(tmp_path / "flat")) == ["000998.png", "000999.png", "001000.png",
                                                                        "001001.png"]
    r = run_sample("--model_path", snap, "--seeds", "0-8", "--grid", "--outdir", str(tmp_path / "grid"))
    assert r.exit_code == 0, r.output
    import PIL.Image

    img = PIL.Image.open(tmp_path / "grid" / "grid.png")
    assert img.size == (24, 24) and img.mode == "L"  # 3×3 tiles of 8×8 grayscale
    assert list(digests(tmp_path / "grid")) == ["grid.png"]


def test_pretrained_sampling_with_any_solver_and_option_errors(tiny_teacher_pkl, tmp_path):
    pkl, _ = tiny_teacher_pkl
    r = run_sample("--model_path", pkl, "--solver", "dpmpp", "--num_steps", "6", "--afs", "True", "--seeds", "0-1",
                   "--outdir", str(tmp_path / "pp"))
    assert r.exit_code == 0, r.output
    assert "NFE 4" in r.output and len(digests(tmp_path / "pp")) == 2
    r = run_sample("--model_path", pkl, "--solver", "heun", "--num_steps", "4", "--seeds", "0",
                   "--outdir", str(tmp_path / "heun"))
    assert r.exit_code == 0 and "NFE 6" in r.output, r.output
    r = run_sample("--model_path", pkl, "--solver", "heun", "--num_steps", "18", "--denoise_to_zero", "--seeds", "0",
                   "--outdir", str(tmp_path / "heun35"))
    assert r.exit_code == 0 and "NFE 35" in r.output, r.output  # EDM's Heun-35


def test_distilled_snapshot_rejects_solver_and_num_steps(snapshot, tmp_path):
    _, run = snapshot
    snap = str(run / "network-snapshot-000005.safetensors")
    r = run_sample("--model_path", snap, "--num_steps", "5", "--outdir", str(tmp_path))
    assert r.exit_code == 2 and "only honoured for SFD-v" in r.output
    r = run_sample("--model_path", snap, "--solver", "heun", "--outdir", str(tmp_path))
    assert r.exit_code == 2 and "--solver" in r.output
    r = run_sample("--model_path", snap, "--dataset_name", "cifar10", "--outdir", str(tmp_path))
    assert r.exit_code == 2 and "tiny" in r.output
    assert not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)


def test_in_process_fid_equals_png_route(snapshot, tmp_path, monkeypatch):
    from tests.test_fid import save_detector
    import fid

    _, run = snapshot
    snap = str(run / "network-snapshot-000020.safetensors")
    det = str(tmp_path / "det.pt")
    save_detector(det, in_channels=1)
    ref_imgs = tmp_path / "ref"
    assert run_sample("--model_path", snap, "--seeds", "100-139", "--outdir", str(ref_imgs)).exit_code == 0
    ref = str(tmp_path / "ref.npz")
    r = CliRunner().invoke(fid.main, ["ref", "--data", str(ref_imgs), "--dest", ref, "--detector", det])
    assert r.exit_code == 0, r.output
    r = run_sample("--model_path", snap, "--seeds", "0-19", "--outdir", str(tmp_path / "gen"), "--fid_ref", ref,
                   "--detector", det, "--batch", "7")
    assert r.exit_code == 0, r.output
    in_process = float(r.output.split("FID:")[1].split()[0])
    r2 = CliRunner().invoke(fid.main, ["calc", "--images", str(tmp_path / "gen"), "--ref", ref, "--detector", det])
    assert r2.exit_code == 0, r2.output
    png_route = float(r2.output.split("FID:")[1].split()[0])
    assert in_process > 0
    assert in_process == pytest.approx(png_route, rel=1e-5)
    monkeypatch.chdir(tmp_path / "gen")
    before = sorted(os.listdir("."))
    r3 = run_sample("--model_path", snap, "--seeds", "0-19", "--no-save", "--fid_ref", ref, "--detector", det)
    assert r3.exit_code == 0 and sorted(os.listdir(".")) == before, r3.output  # no ./samples either
    assert float(r3.output.split("FID:")[1].split()[0]) == pytest.approx(in_process, rel=1e-6)


@pytest.mark.slow
def test_two_torchrun_processes_write_the_same_pngs(snapshot, tmp_path):
    _, run = snapshot
    snap = str(run / "network-snapshot-000020.safetensors")
    one = tmp_path / "one"
    assert run_sample("--model_path", snap, "--seeds", "0-8", "--batch", "4", "--outdir", str(one)).exit_code == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "sample.py"), "--model_path", snap, "--seeds", "0-8", "--batch", "2",
           "--outdir", str(tmp_path / "two"), "--device", "cpu"]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert digests(one) == digests(tmp_path / "two") and len(digests(one)) == 9


def test_speed_switches_keep_the_images(snapshot, tmp_path):
    import numpy as np
    import PIL.Image

    _, run = snapshot
    snap = str(run / "network-snapshot-000020.safetensors")
    assert run_sample("--model_path", snap, "--seeds", "0-5", "--outdir", str(tmp_path / "plain")).exit_code == 0
    r = run_sample("--model_path", snap, "--seeds", "0-5", "--outdir", str(tmp_path / "fast"), "--channels_last",
                   "--precision", "bf16")  # bf16 is armed on CUDA only: on the CPU this is the fp32 path
    assert r.exit_code == 0, r.output
    for name in digests(tmp_path / "plain"):
        a = np.asarray(PIL.Image.open(tmp_path / "plain" / name), dtype=int)
        b = np.asarray(PIL.Image.open(tmp_path / "fast" / name), dtype=int)
        assert np.abs(a - b).max() <= 1, name


@pytest.mark.parametrize("args, option", [
    (["--solver", "dpmpp", "--max_order", "9"], "--max_order"),
    (["--solver", "ipndm", "--max_order", "0"], "--max_order"),
    (["--sigma_min", "-1"], "--sigma_min"),
    (["--sigma_min", "100", "--sigma_max", "1"], "--sigma_min"),
    (["--sigma_min", "100"], "--sigma_min"),  # above the model's own sigma_max: found once the model is loaded
    (["--schedule_rho", "0"], "--schedule_rho"),
    (["--schedule_type", "discrete"], "--schedule_type"),  # an EDM model has no discrete time
    (["--num_steps", "2", "--afs", "True"], "--num_steps"),  # NFE 0
])
def test_pretrained_sampling_options_fail_in_one_line_before_sampling(tiny_teacher_pkl, tmp_path, monkeypatch,
                                                                     args, option):
    sampled = []
    monkeypatch.setattr(sample, "generate", lambda *a, **k: sampled.append(1))
    r = run_sample("--model_path", tiny_teacher_pkl[0], "--seeds", "0-1", "--outdir", str(tmp_path), *args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("Error: Invalid value for") and option in lines[-1], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not sampled and not os.listdir(tmp_path)


@pytest.mark.parametrize("option, value", [("--sigma_min", "0.01"), ("--sigma_max", "50"), ("--max_order", "2"),
                                           ("--predict_x0", "False"), ("--lower_order_final", "False"),
                                           ("--thresholding", "False")])
def test_distilled_snapshot_refuses_every_solver_option(snapshot, tmp_path, option, value):
    snap = str(snapshot[1] / "network-snapshot-000005.safetensors")
    r = run_sample("--model_path", snap, option, value, "--outdir", str(tmp_path))
    assert r.exit_code == 2 and f"drop {option}" in r.output, r.output


# --- Bad input is one line and exit code 2, before any work and with nothing written -------------------------------
# Every case runs in a fresh folder laid out by `refusal_workspace` (relative paths below point into it), on the tiny
# teacher pickle unless the case gives its own --model_path. `pre-load` cases must be refused before the network is
# loaded, `post-load` ones (which need to know the model) after loading but before anything is sampled.

def refusal_workspace(root):
    """afile (a file), adir (a folder), ref.npz and det.pt (files), and runs where the quickstart puts them:
    exps/quickstart/00000-* .. 00002-* (none directly in ./exps)."""
    (root / "afile").write_text("not a folder")
    (root / "adir").mkdir()
    (root / "ref.npz").write_bytes(b"")
    (root / "det.pt").write_bytes(b"")
    for k in range(3):
        (root / "exps" / "quickstart" / f"{k:05d}-fmnist-4-2-dpmpp-3-poly7.0-afs").mkdir(parents=True)


def assert_refused(r, fragment, option, before, root):
    assert_one_line_refusal(r, fragment, *([option] if option else []))
    assert tree(root) == before  # nothing written: no outdir, no ./samples, no stray files


@pytest.fixture
def refusal_run(tiny_teacher_pkl, tmp_path, monkeypatch):
    """run(args, loads): invokes sample.py in a fresh workspace; fails the test if the network is loaded when
    `loads` is False, or if any image is generated."""
    import models

    root = tmp_path / "work"
    root.mkdir()
    refusal_workspace(root)
    monkeypatch.chdir(root)
    loads, generated = [], []
    real_load = models.load_network

    def loader(*a, **k):
        loads.append(k)
        return real_load(*a, **k)

    monkeypatch.setattr(models, "load_network", loader)
    monkeypatch.setattr(sample, "generate", lambda *a, **k: generated.append(1) or pytest.fail("sampling started"))

    def run(args, fragment, option, may_load):
        before = tree(root)
        r = run_sample("--model_path", tiny_teacher_pkl[0], "--seeds", "0-1", *args)
        assert_refused(r, fragment, option, before, root)
        assert not generated
        assert may_load or not loads, "the network was loaded before the refusal"
        return r

    return run


REFUSED_BEFORE_LOADING = [
    # bad paths
    (["--outdir", "afile"], "afile is a file, not a folder", "--outdir"),
    (["--outdir", "afile/run"], "is a file, so afile/run cannot be made", "--outdir"),
    (["--model_path", "missing.pkl"], "no such file: missing.pkl", "--model_path"),
    (["--model_path", "adir"], "adir holds no network snapshot yet", "--model_path"),
    (["--fid_ref", "missing.npz", "--no-save"], "no such file: missing.npz", "--fid_ref"),
    (["--fid_ref", "adir", "--no-save"], "adir is a folder", "--fid_ref"),
    (["--captions", "missing.csv"], "no such file: missing.csv", "--captions"),
    (["--captions", "adir"], "adir is a folder", "--captions"),
    (["--fid_ref", "ref.npz", "--no-save", "--detector", "missing.pt"], "no such file: missing.pt", "--detector"),
    (["--fid_ref", "ref.npz", "--no-save", "--detector", "afile"], "unknown format", "--detector"),
    (["--model_path", "0", "--exps_dir", "afile"], "afile is a file, not a folder of experiments", "--exps_dir"),
    (["--model_path", "0", "--exps_dir", "nowhere"], "nowhere does not exist: add --exps_dir=DIR", "--model_path"),
    (["--model_path", "0"], "exps/quickstart holds runs 00000..00002: add --exps_dir=exps/quickstart",
     "--model_path"),
    (["--model_path", "7", "--exps_dir", "exps/quickstart"], "exps/quickstart holds runs 00000..00002",
     "--model_path"),
    # bad devices
    (["--device", "cuda:99"], "cuda:99", "--device"),
    (["--device", "gpu0"], "'gpu0' is not a device", "--device"),
    (["--device", "meta"], "only cpu and cuda devices are supported", "--device"),
    # bad ranges
    (["--seeds", "0,0,1"], "lists 0 twice; each seed is one image", "--seeds"),
    (["--seeds", "0-3,2-5,3"], "lists 2 twice, 3 3 times", "--seeds"),
    (["--seeds", "4294967296"], "4294967296 is too large", "--seeds"),
    (["--batch", "0"], "0 is not in the range x>=1", "--batch"),
    (["--num_steps", "1"], "1 is not in the range x>=2", "--num_steps"),
    # contradictions
    (["--no-save"], "--no-save without --fid_ref would produce nothing", "--save"),
    (["--fid_ref", "ref.npz", "--no-save", "--grid"], "--no-save writes no images; drop --grid", "--grid"),
    (["--fid_ref", "ref.npz", "--no-save", "--subdirs", "False"], "drop --subdirs", "--subdirs"),
    (["--fid_ref", "ref.npz", "--no-save", "--outdir", "out"], "drop --outdir", "--outdir"),
    (["--grid", "--subdirs", "True"], "--grid writes one grid.png", "--subdirs"),
    (["--detector", "det.pt"], "the detector is used only for --fid_ref", "--detector"),
    (["--prompt", "a cat", "--captions", "afile"], "drop one of them", "--captions"),
    (["--solver", "heun", "--max_order", "2"], "--solver=heun has no max_order", "--max_order"),
    (["--solver", "ipndm", "--thresholding", "False"], "--solver=ipndm has no thresholding; it applies to "
     "--solver=dpmpp", "--thresholding"),
    (["--schedule_type", "logsnr", "--schedule_rho", "3"], "the logsnr schedule has no exponent", "--schedule_rho"),
]


@pytest.mark.parametrize("args, fragment, option", REFUSED_BEFORE_LOADING,
                         ids=[" ".join(case[0]) for case in REFUSED_BEFORE_LOADING])
def test_bad_input_is_refused_in_one_line_before_loading(refusal_run, args, fragment, option):
    refusal_run(args, fragment, option, may_load=False)


REFUSED_AFTER_LOADING = [  # what only the model tells: refused before sampling, nothing written
    (["--prompt", "a cat"], "this model takes no text", "--prompt"),
    (["--captions", "afile"], "this model takes no captions", "--captions"),
    (["--max_order", "2"], "the default solver, euler, has no max_order", "--max_order"),
    (["--predict_x0", "False", "--no-save", "--fid_ref", "ref.npz"], "has no predict_x0", "--predict_x0"),
]


@pytest.mark.parametrize("args, fragment, option", REFUSED_AFTER_LOADING,
                         ids=[" ".join(case[0]) for case in REFUSED_AFTER_LOADING])
def test_options_the_model_cannot_use_are_refused_before_sampling(refusal_run, args, fragment, option):
    refusal_run(args, fragment, option, may_load=True)


@pytest.mark.parametrize("blocker, may_load", [("samples", False), ("samples/tiny-edm", True)])
def test_default_outdir_that_cannot_be_made_is_refused(refusal_run, blocker, may_load):
    os.makedirs(os.path.dirname(blocker) or ".", exist_ok=True)
    open(blocker, "w").close()  # a file where the default output folder goes
    refusal_run([], f"{blocker} is a file", "--outdir", may_load=may_load)


def test_seeds_without_a_caption_are_refused_before_sampling(refusal_run, tiny_teacher_pkl, monkeypatch):
    """A text model samples the caption of row `seed`: seeds past the caption file are refused up front."""
    import types

    import models
    from models.latent.precond import TextToImagePrecond

    real_load = models.load_network

    def text_model(*a, **k):  # the tiny teacher dressed as a text model with a 3-row caption file
        loaded = real_load(*a, **k)
        net = loaded.net
        net._captions = lambda: ["a", "b", "c"]
        net.captions_for_seeds = types.MethodType(TextToImagePrecond.captions_for_seeds, net)
        net.encode_prompts = lambda prompts: pytest.fail("prompts encoded")
        return loaded

    monkeypatch.setattr(models, "load_network", text_model)
    r = refusal_run(["--seeds", "1-3"], "seed 3 has no caption (the caption file has 3 rows)", None, may_load=True)
    assert "use seeds 0-2 or --prompt" in r.output


def test_default_outdir_is_named_after_the_model_file_and_printed(tiny_teacher_pkl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_sample("--model_path", tiny_teacher_pkl[0], "--seeds", "0", "--num_steps", "2")
    assert r.exit_code == 0, r.output
    where = os.path.join(".", "samples", "tiny-edm", "euler_step2_nfe1")
    assert f"images to {where}" in r.output and f"Done: 1 images in {where}" in r.output
    assert sorted(digests(tmp_path / "samples")) == [os.path.join("tiny-edm", "euler_step2_nfe1", "000000",
                                                                  "000000.png")]


def test_guidance_the_network_cannot_apply_is_reported(tmp_path):
    path = tmp_path / "cfg.safetensors"
    save_snapshot(str(path), build_tiny_edm(seed=0), dict(SETTINGS, guidance_type="cfg", guidance_rate=7.5))
    r = run_sample("--model_path", str(path), "--seeds", "0", "--outdir", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert ("Note: the snapshot records classifier-free guidance (guidance_rate 7.5), which this network cannot "
            "apply; sampling without guidance") in r.output
    assert "NFE 2," in r.output  # the calls actually made, not doubled


def test_a_dataset_name_other_than_the_snapshots_is_refused_in_one_line(snapshot, tmp_path):
    _, run = snapshot
    snap = str(run / "network-snapshot-000020.safetensors")
    r = run_sample("--model_path", snap, "--dataset_name", "cifar10", "--seeds", "0", "--outdir", str(tmp_path / "o"))
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "trained for dataset_name='tiny'" in r.output and "not 'cifar10'" in r.output
    assert not os.path.exists(tmp_path / "o")

"""sample.py: determinism across batch sizes and processes, output layouts, experiment lookup, in-process FID."""

import glob
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import sample
from models import save_snapshot
from tests.conftest import ROOT, build_tiny_edm

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


def test_parse_int_list():
    assert sample.parse_int_list("1,2,5-8") == [1, 2, 5, 6, 7, 8]
    for bad in ("a", "5-2", "1,,2"):
        with pytest.raises(Exception):
            sample.parse_int_list(bad)


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


def test_in_process_fid_equals_png_route(snapshot, tmp_path):
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
    r3 = run_sample("--model_path", snap, "--seeds", "0-19", "--no-save", "--fid_ref", ref, "--detector", det,
                    "--outdir", str(tmp_path / "nosave"))
    assert r3.exit_code == 0 and not os.path.exists(tmp_path / "nosave")
    assert float(r3.output.split("FID:")[1].split()[0]) == pytest.approx(in_process, rel=1e-6)


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

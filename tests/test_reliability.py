"""Resume after SIGKILL, NaN fallback, malicious pickles, offline downloads (non-finite gradients reaching Adam:
tests/test_loop_behaviour.py)."""

import glob
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import dnnlib
from tests.conftest import DEVICES, ROOT
from training import sfd_loss
from training.training_loop import training_loop


def _train_cmd(outdir, pkl, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--outdir", str(outdir), "--model_path", pkl,
            "--batch", "4", "--seed", "7", "--device", "cpu", "--tick", "0.02", *extra]


def _stats(run):
    return [json.loads(line) for line in open(os.path.join(run, "stats.jsonl"))]


@pytest.mark.slow
def test_sigkill_then_resume_finishes_the_run_and_matches_an_uninterrupted_one(tmp_path, tiny_teacher_pkl):
    pkl, _ = tiny_teacher_pkl
    env = dict(os.environ, OMP_NUM_THREADS="1")
    total = "0.2"  # 50 iterations of batch 4, a tick every 5
    # The uninterrupted run with the same seed, beside the one to be killed (2 cores, one thread each).
    straight_proc = subprocess.Popen(_train_cmd(tmp_path / "straight", pkl, "--total_kimg", total, "--dump", "1"),
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_train_cmd(tmp_path / "killed", pkl, "--total_kimg", total, "--dump", "1"),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    run = None
    while time.time() < deadline:
        runs = glob.glob(str(tmp_path / "killed" / "00000-*"))
        if runs and os.path.exists(os.path.join(runs[0], "stats.jsonl")) and len(_stats(runs[0])) >= 4:
            run = runs[0]
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run is not None, "the run made no progress"
    killed_at = _stats(run)[-1]["kimg"]
    assert killed_at < float(total), "the run finished before it could be killed; make it longer"
    # A kill during a write may leave a temporary file, never a truncated dump/snapshot under its final name.
    for path in glob.glob(os.path.join(run, "*.pt")) + glob.glob(os.path.join(run, "*.safetensors")):
        assert os.path.getsize(path) > 0

    r = subprocess.run(_train_cmd(tmp_path / "killed", pkl, "--resume", "0"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Resuming from" in r.stdout
    assert not glob.glob(os.path.join(run, "*.tmp*"))  # stale temporaries of the killed run are cleaned up
    assert sorted(os.listdir(tmp_path / "killed")) == [os.path.basename(run)]  # same folder, no new one
    stats = _stats(run)
    kimgs = [s["kimg"] for s in stats]
    assert kimgs == sorted(set(kimgs)) and kimgs[-1] == pytest.approx(float(total))
    assert len(kimgs) == 10  # one line per tick, none lost, none doubled

    # The uninterrupted run: same loss curve and same final weights.
    _, straight_err = straight_proc.communicate(timeout=300)
    assert straight_proc.returncode == 0, straight_err
    straight = _stats(glob.glob(str(tmp_path / "straight" / "00000-*"))[0])
    for a, b in zip(stats, straight):
        assert a["kimg"] == b["kimg"]
        for key in b["loss"]:
            assert a["loss"][key] == pytest.approx(b["loss"][key], rel=1e-4, abs=1e-7)
    from models import load_snapshot

    net_a, _ = load_snapshot(glob.glob(os.path.join(run, "network-snapshot-*.safetensors"))[0])
    net_b, _ = load_snapshot(glob.glob(str(tmp_path / "straight" / "00000-*" / "network-snapshot-*"))[0])
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_loss_falls_back_at_the_next_iteration_without_a_stall(tiny_teacher_pkl, monkeypatch, capsys, device):
    """A NaN loss in iteration 2 switches the run to fp32 at the start of iteration 3, from the check that follows
    the teacher work (not at a tick). On CUDA that check reads the flag that iteration 2 published behind a CUDA
    event (one iteration of lag, no pipeline drain); on a CPU it reads the flag itself."""
    from training import precision
    from training import sfd_iteration as iteration_module

    pkl, _ = tiny_teacher_pkl
    real = sfd_loss.l1_loss
    calls, checks, fallbacks = [], [], []

    def poisoned(a, b):
        calls.append(1)
        out = real(a, b)
        return out * float("nan") if len(calls) == 4 else out  # one NaN loss, first step of iteration 2

    real_seen, real_fall_back = precision.NonFiniteWatch.seen, iteration_module.fall_back

    def seen(watch, now=False):
        result = real_seen(watch, now=now)
        checks.append(dict(now=now, lagged=watch.lagged, published=getattr(watch, "published", None), seen=result))
        return result

    def fall_back(mode):
        fallbacks.append(len(calls))  # loss evaluations so far: 3 per iteration
        real_fall_back(mode)

    monkeypatch.setattr(sfd_loss, "l1_loss", poisoned)
    monkeypatch.setattr(precision.NonFiniteWatch, "seen", seen)
    monkeypatch.setattr(iteration_module, "fall_back", fall_back)
    res = training_loop(model_path=pkl, batch_size=4, total_kimg=0.016, seed=0, device=device, progress=False,
                        lr=1e-3, kimg_per_tick=1, mixed_on_cpu=True)
    assert "continuing in fp32" in capsys.readouterr().out
    assert fallbacks == [6]  # at the start of iteration 3 (after its teacher, before its student losses)
    first = next(c for c in checks if c["seen"])
    assert first["now"] is False and first["lagged"] is (device == "cuda")
    if device == "cuda":
        assert first["published"] is True  # the flag came through the pinned copy behind the CUDA event
    assert all(torch.isfinite(p).all() for p in res.net.parameters())
    assert res.net.use_fp16 is False and res.teacher.use_fp16 is False


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def evil_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": _Boom(marker)}, f)
    return str(path), marker


def test_malicious_pickle_is_refused_by_every_command(evil_pickle, tmp_path):
    import fid
    import prdc
    import sample
    import train

    path, marker = evil_pickle
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path / "exps"), "--model_path", path, "--batch", "4",
                                        "--total_kimg", "0.004", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert re.search(r"refused to load global '(os|posix)\.system'", r.output), r.output
    r = CliRunner().invoke(sample.main, ["--model_path", path, "--device", "cpu", "--outdir", str(tmp_path / "s")])
    assert r.exit_code == 2, r.output
    assert re.search(r"refused to load global '(os|posix)\.system'", r.output), r.output
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    import numpy as np
    import PIL.Image

    for k in range(3):
        PIL.Image.fromarray(np.full([8, 8, 3], 40 * k, np.uint8)).save(imgs / f"{k}.png")
    r = CliRunner().invoke(fid.main, ["ref", "--data", str(imgs), "--dest", str(tmp_path / "r.npz"),
                                      "--detector", path])
    detector_refused = r"refers to (os|posix)\.system, which the detector loader does not allow"
    assert r.exit_code == 2, r.output
    assert re.search(detector_refused, r.output), r.output
    r = CliRunner().invoke(prdc.main, ["calc", "--images", str(imgs), "--images_ref", str(imgs), "--nearest_k", "1",
                                       "--detector", path])  # k = 1: three images are enough to reach the detector
    assert r.exit_code == 2, r.output
    assert re.search(detector_refused, r.output), r.output
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "exps") and not os.path.exists(tmp_path / "s")


def test_truncated_checkpoint_is_one_clear_line(tiny_teacher_pkl, tmp_path):
    import sample
    import train

    pkl, _ = tiny_teacher_pkl
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(open(pkl, "rb").read()[:2000])
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path / "exps"), "--model_path", str(cut), "--batch", "4",
                                        "--total_kimg", "0.004", "--device", "cpu"])
    assert r.exit_code == 2 and "Traceback" not in r.output and r.output.strip().splitlines()[-1].startswith("Error")
    r = CliRunner().invoke(sample.main, ["--model_path", str(cut), "--device", "cpu"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_download_without_network_fails_fast_naming_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_OFFLINE", "0")
    url = "http://127.0.0.1:9/edm-cifar10-32x32-uncond-vp.pkl"  # nothing listens on the discard port
    t0 = time.time()
    with pytest.raises(dnnlib.DownloadError) as e:
        dnnlib.download_file(url, str(tmp_path / "src" / "cifar10"), timeout=5)
    assert time.time() - t0 < 30
    msg = str(e.value)
    assert "edm-cifar10-32x32-uncond-vp.pkl" in msg and url in msg and str(tmp_path / "src" / "cifar10") in msg
    assert os.listdir(tmp_path / "src" / "cifar10") == []  # no partial file left behind

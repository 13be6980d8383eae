"""The benchmark scripts run in their CPU mode and report what they promise (numbers are not judged)."""

import json
import os
import re
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

import solvers
from tests.conftest import ROOT


def run_script(name, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SFD_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0]), proc.stdout


def check_env(result):
    env = result["env"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["device_name"]


@pytest.mark.slow
def test_bench_train_tiny(tmp_path):
    json_path = tmp_path / "out" / "bench.jsonl"
    r, stdout = run_script("bench_train.py", "--tiny", "--device=cpu", "--batch=4", "--warmup_kimg=0.004",
                           "--kimg=0.008", "--json", str(json_path), cwd=tmp_path)
    assert r["bench"] == "train"
    check_env(r)
    s = r["settings"]
    assert s["network"] == "tiny" and s["batch"] == 4 and s["mixed_precision"] is False
    assert s["warmup_kimg"] == pytest.approx(0.004) and s["measured_kimg"] == pytest.approx(0.008)
    # The probes saw the recipe's network calls: DPM-Solver++ over (M+1)(N-1)+1 = 13 points, AFS student.
    assert r["teacher_forwards_per_traj"] == solvers.nfe_of("dpmpp", 13) == 12
    assert r["student_fwdbwd_per_traj"] == solvers.nfe_of("euler", 4, afs=True) == 2
    assert r["flops_per_traj"] == pytest.approx(r["flops_per_forward"] * (12 + 3 * 2))
    assert r["s_per_kimg"] > 0 and r["tflops"] == pytest.approx(r["flops_per_traj"] * 1000 / r["s_per_kimg"] / 1e12)
    assert r["peak_mem_gb"] > 0 and r["peak_mem_kind"] == "cpu_max_rss"
    phases = [r[f"{k}_s_per_kimg"] for k in ("teacher", "student_forward", "optimizer")]
    assert all(p > 0 for p in phases) and sum(phases) < r["s_per_kimg"]
    assert "s/kimg" in stdout and "TFLOP/s = F*(T + 3*S)" in stdout and "peak memory" in stdout
    assert json.loads(json_path.read_text().splitlines()[-1]) == r


def test_bench_sample_tiny(tmp_path):
    r, stdout = run_script("bench_sample.py", "--tiny", "--device=cpu", "--batch=3", "--batches=2", "--warmup=1",
                           cwd=tmp_path)
    assert r["bench"] == "sample"
    check_env(r)
    s = r["settings"]
    assert (s["solver"], s["num_steps"], s["afs"], s["nfe"], s["batch"]) == ("euler", 4, True, 2, 3)
    assert r["img_per_s_png_off"] > 0 and r["img_per_s_png_on"] > 0
    assert r["tflops_png_off"] == pytest.approx(r["flops_per_forward"] * 2 * r["img_per_s_png_off"] / 1e12)
    assert r["pngs_written"] == (1 + 2) * 3  # warm-up and measured batches of the PNG-on pass
    assert r["latents_ms_per_batch"] > 0
    assert "PNG off" in stdout and "PNG on" in stdout
    assert not list(tmp_path.iterdir())  # PNGs went to a temporary folder that is gone


@pytest.mark.slow
def test_bench_sample_fast_path_switches(tmp_path):
    """sample.py's switches reach the benchmark: channels-last and a compiled (traced) network; mixed precision
    stays off on a CPU as in sample.py."""
    r, _ = run_script("bench_sample.py", "--tiny", "--device=cpu", "--batch=3", "--batches=1", "--warmup=1",
                      "--png=off", "--precision=bf16", "--channels_last", "--compile=aot_eager", cwd=tmp_path)
    s = r["settings"]
    assert (s["precision"], s["channels_last"], s["compile"]) == ("fp32", True, "aot_eager")
    assert r["img_per_s_png_off"] > 0 and "img_per_s_png_on" not in r


@pytest.mark.slow
def test_bench_fid_tiny(tmp_path):
    r, stdout = run_script("bench_fid.py", "--tiny", "--device=cpu", "--channels=1", cwd=tmp_path)
    assert r["bench"] == "fid"
    check_env(r)
    assert r["settings"]["detector"].startswith("random-weight InceptionV3")
    assert r["feature_dim"] == 2048 and r["features_finite"] is True
    assert r["img_per_s"] > 0 and r["flops_per_image"] == pytest.approx(11.42e9, rel=0.01)
    assert "img/s" in stdout


def test_flop_formula_matches_a_counted_training_iteration(tmp_path):
    """F·(T + 3·S) against FlopCounterMode over one real iteration (teacher, student forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import common
    from torch_utils.persistence import save_edm_pickle
    from training.training_loop import training_loop

    net = common.build_edm(tiny=True)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution])
    per_forward = common.forward_flops(lambda: net(x, torch.ones(2)), batch=2)
    save_edm_pickle(str(tmp_path / "t.pkl"), {"ema": net})
    batch = 2
    with FlopCounterMode(display=False) as counter:
        training_loop(model_path=str(tmp_path / "t.pkl"), batch_size=batch, total_kimg=(batch - 0.5) / 1000,
                      device="cpu", progress=False)
    counted = counter.get_total_flops() / batch
    assert counted == pytest.approx(per_forward * (12 + 3 * 2), rel=0.05)


def test_loop_kwargs_are_checked_against_training_loop():
    from benchmarks.bench_train import parse_loop_kwargs
    from training.training_loop import training_loop

    assert parse_loop_kwargs(["lpips=false", "seed=3", "schedule_type=logsnr"], training_loop) == dict(
        lpips=False, seed=3, schedule_type="logsnr")
    with pytest.raises(click.BadParameter, match="no keyword"):
        parse_loop_kwargs(["no_such_option=1"], training_loop)
    with pytest.raises(click.BadParameter, match="NAME=VALUE"):
        parse_loop_kwargs(["lpips"], training_loop)


@pytest.mark.slow
def test_check_equivalence_tiny_measures_what_it_claims(tmp_path):
    """bf16 autocast changes the losses by mixed-precision noise, not more; channels-last through a traced graph
    changes nothing beyond float32 rounding; EDM's fp16 is CUDA-only, so on a CPU it is the fp32 path exactly."""
    r, stdout = run_script("check_equivalence.py", "--tiny", "--device=cpu", "--batch=4", "--kimg=0.012",
                           "--seeds=6", "--fast", 'precision="bf16"', "--fast", "channels_last=true",
                           "--sample_fast", "channels_last=true", cwd=tmp_path)
    assert r["bench"] == "equivalence"
    check_env(r)
    assert r["settings"]["iterations"] == 3 and r["settings"]["steps_per_iteration"] == 3
    fast, fp16 = r["loss_rel_diff"]["fast"], r["loss_rel_diff"]["fp16"]
    assert 1e-5 < fast["median"] <= fast["max"] < 2e-2  # bf16 keeps 8 mantissa bits: visible, small
    assert fp16["max"] == 0
    psnr = r["psnr_db"]
    assert 30 < psnr["fast_trained"] < 100 and psnr["fp16_trained"] > 140 and psnr["fast_sampling"] > 60
    assert len(r["losses"]["fp32"]) == 3 and "relative difference median" in stdout


@pytest.mark.slow
def test_openai_unet_benchmark_compares_ours_with_diffusers():
    from benchmarks import bench_openai_unet

    result = CliRunner().invoke(bench_openai_unet.main, ["--resolution", "32", "--model_channels", "64", "--batch", "1",
                                                         "--repeats", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rel = float(re.search(r"max \|ours - diffusers\| / max \|diffusers\| = (\S+)", result.output).group(1))
    assert rel < 1e-5 and "ratio ours/diffusers" in result.output

"""The benchmark scripts and the one GPU call (benchmarks/run_gpu.sh) run in their CPU mode and report what they
promise (numbers are not judged); the report computes its ratios and verdicts from the lines it is given."""

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


def check_env(result):
    env = result["env"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["device_name"]


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
def test_openai_unet_benchmark_compares_ours_with_diffusers():
    from benchmarks import bench_openai_unet

    result = CliRunner().invoke(bench_openai_unet.main, ["--resolution", "32", "--model_channels", "64", "--batch", "1",
                                                         "--repeats", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rel = float(re.search(r"max \|ours - diffusers\| / max \|diffusers\| = (\S+)", result.output).group(1))
    assert rel < 1e-5 and "ratio ours/diffusers" in result.output


STANDIN = os.path.join(ROOT, "tests", "paper_anchor_standin.py")
REAL_TIMER = os.path.join(ROOT, ".anchors", "bench_paper.py")


def untracked_files():
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                         text=True).stdout
    return {line[3:] for line in out.splitlines() if line.startswith("??")}


def bench_lines(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def check_train(r, fast):
    """A bench_train.py line of the dry run: the recipe's network calls, its FLOP formula, its profile."""
    check_env(r)
    s = r["settings"]
    assert s["network"] == "tiny" and s["batch"] == 4 and s["fast"] is fast and s["mixed_precision"] is False
    assert s["warmup_kimg"] == pytest.approx(0.004) and s["measured_kimg"] == pytest.approx(0.008)
    if fast:  # FAST_TRAIN reached the loop, its compile overridden by --loop_kwarg
        from benchmarks.common import FAST_TRAIN

        assert {k: s[k] for k in FAST_TRAIN} == dict(FAST_TRAIN, compile="aot_eager")
    else:
        assert s["precision"] == "fp16" and "compile" not in s
    # DPM-Solver++ over (M+1)(N-1)+1 = 13 points, AFS student
    assert r["teacher_forwards_per_traj"] == solvers.nfe_of("dpmpp", 13) == 12
    assert r["student_fwdbwd_per_traj"] == solvers.nfe_of("euler", 4, afs=True) == 2
    assert r["flops_per_traj"] == pytest.approx(r["flops_per_forward"] * (12 + 3 * 2))
    assert r["s_per_kimg"] > 0 and r["tflops"] == pytest.approx(r["flops_per_traj"] * 1000 / r["s_per_kimg"] / 1e12)
    assert r["peak_mem_gb"] > 0 and r["peak_mem_kind"] == "cpu_max_rss"
    phases = [r[f"{k}_s_per_kimg"] for k in ("teacher", "student_forward", "optimizer")]
    assert all(p > 0 for p in phases) and sum(phases) < r["s_per_kimg"]
    prof = r["profile"]
    names = {op["name"] for op in prof["top_cpu_ops"]}
    assert prof["wall_ms"] > 0 and prof["host_syncs"] == 0 and prof["top_kernels"] == []  # no CUDA on a CPU
    assert "aten::convolution_backward" in names  # the profiled region holds a student backward
    assert "top operators (self CPU time)" in prof["text"]


def check_sample(r, fast):
    check_env(r)
    s = r["settings"]
    assert (s["solver"], s["num_steps"], s["afs"], s["nfe"], s["batch"], s["fast"]) == ("euler", 4, True, 2, 8, fast)
    # sample.py's switches: mixed precision stays off on a CPU; --compile on the command line overrides --fast's
    expected = (True, "aot_eager") if fast else (False, False)
    assert s["precision"] == "fp32" and (s["channels_last"], s["compile"]) == expected
    assert r["img_per_s_png_off"] > 0 and r["img_per_s_png_on"] > 0
    assert r["tflops_png_off"] == pytest.approx(r["flops_per_forward"] * 2 * r["img_per_s_png_off"] / 1e12)
    assert r["pngs_written"] == (1 + 2) * 8  # warm-up and measured batches of the PNG-on pass
    assert r["latents_ms_per_batch"] > 0


def check_equivalence(r):
    """bf16 autocast changes the losses by mixed-precision noise, not more; channels-last through a traced graph
    changes nothing beyond float32 rounding; EDM's fp16 is CUDA-only, so on a CPU it is the fp32 path exactly."""
    check_env(r)
    assert r["settings"]["iterations"] == 3 and r["settings"]["steps_per_iteration"] == 3
    fast, fp16 = r["loss_rel_diff"]["fast"], r["loss_rel_diff"]["fp16"]
    assert 1e-5 < fast["median"] <= fast["max"] < 2e-2  # bf16 keeps 8 mantissa bits: visible, small
    assert fp16["max"] == 0
    psnr = r["psnr_db"]
    assert 30 < psnr["fast_trained"] < 100 and psnr["fp16_trained"] > 140 and psnr["fast_sampling"] > 60
    assert len(r["losses"]["fp32"]) == 3


def check_fid(r):
    check_env(r)
    assert r["settings"]["detector"].startswith("random-weight InceptionV3")
    assert r["feature_dim"] == 2048 and r["features_finite"] is True
    assert r["img_per_s"] > 0 and r["flops_per_image"] == pytest.approx(11.42e9, rel=0.01)


@pytest.mark.slow
def test_run_gpu_dry_run_runs_every_step_and_reports(tmp_path):
    """benchmarks/run_gpu.sh with TINY=1: every step of the device call runs on the CPU at tiny sizes (the paper
    timer's invocation checked by its stand-in), each writes its JSON line, nothing is written outside $OUT, and
    report.py turns the lines into the README's table."""
    out = tmp_path / "out"
    before = untracked_files()
    env = dict(os.environ, TINY="1", OUT=str(out), PAPER=STANDIN, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", SFD_OFFLINE="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    log = (out / "bench.log").read_text()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = bench_lines(out / "bench.jsonl")
    steps = {r["name"]: r for r in lines if r.get("bench") == "step"}
    assert list(steps) == ["pytest_gpu", "paper", "train_paper", "train_fast", "sample_fp32", "sample_fast",
                           "equivalence", "fid", "torchrun"]
    assert all(r["rc"] == "0" for r in steps.values()), (steps, log[-3000:])
    assert untracked_files() == before

    call = lines[0]
    assert call["bench"] == "call" and call["tiny"] is True and "bash benchmarks/run_gpu.sh" in call["command"]
    assert {r["what"] for r in lines if "what" in r} == {"paper_train", "paper_sample_nfe2"}
    ours = {}
    for r in lines:
        if r.get("bench") in ("train", "sample"):
            ours[r["bench"], r["settings"]["fast"]] = r
        elif r.get("bench") in ("equivalence", "fid", "torchrun"):
            ours[r["bench"]] = r
    check_train(ours["train", False], fast=False)
    check_train(ours["train", True], fast=True)
    check_sample(ours["sample", False], fast=False)
    check_sample(ours["sample", True], fast=True)
    check_equivalence(ours["equivalence"])
    check_fid(ours["fid"])
    ddp = ours["torchrun"]
    assert ddp["ok"] and (ddp["backend"], ddp["ddp"], ddp["ranks_in_sync"], ddp["snapshots"]) == ("gloo", True, True, 1)
    assert "--nproc_per_node=1" in ddp["command"]
    xml = (out / "pytest-gpu.xml").read_text()
    assert 'skipped="6"' in xml and 'failures="0"' in xml  # the six CUDA variants, skipped without a GPU
    assert "TFLOP/s = F*(T + 3*S)" in log and "PNG off" in log and "relative difference median" in log

    report = (out / "report.md").read_text()
    assert "CPU dry run" in report and "Every step finished." in report and str(out) not in report
    assert report.count("\n| ") == 14  # header and 13 rows
    assert "torchrun --nproc_per_node=1 train.py: process group, DDP, ranks in sync | — | gloo, DDP True" in report


def test_recorded_paper_timer_interface_matches_the_timer(tmp_path):
    """The stand-in's recording (tests/data/paper_anchor) is what the real timer accepts and writes."""
    if not os.path.isfile(REAL_TIMER):
        pytest.skip("no .anchors/bench_paper.py in this checkout (copied in by hand before a device call)")
    env = dict(os.environ, COLUMNS="80", OMP_NUM_THREADS="1")
    help_text = subprocess.run([sys.executable, REAL_TIMER, "--help"], env=env, capture_output=True, text=True).stdout
    assert help_text == open(os.path.join(ROOT, "tests", "data", "paper_anchor", "help.txt")).read()
    proc = subprocess.run([sys.executable, REAL_TIMER, "--tiny", "--device", "cpu", "--json", str(tmp_path / "t.jsonl")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    real = bench_lines(tmp_path / "t.jsonl")
    recorded = bench_lines(os.path.join(ROOT, "tests", "data", "paper_anchor", "tiny.jsonl"))
    assert [(r["what"], sorted(r)) for r in real] == [(r["what"], sorted(r)) for r in recorded]


def test_paper_timer_stand_in_refuses_what_the_timer_refuses(tmp_path):
    def standin(*args):
        return subprocess.run([sys.executable, STANDIN, *args], capture_output=True, text=True)

    ok = standin("--tiny", "--device", "cpu", "--json", str(tmp_path / "p.jsonl"))
    assert ok.returncode == 0 and len(bench_lines(tmp_path / "p.jsonl")) == 2
    for bad in (["--no_such_option"], ["--kimg"], ["--sample_tf32", "maybe"], ["--tiny=1"]):
        result = standin(*bad)
        assert result.returncode == 2 and "error:" in result.stderr, bad


def paper_and_ours(paper_s_per_kimg=4.0, ours_fast=1.6, paper_mem=9.0, ours_mem=8.0, paper_img=1000.0,
                   fp32_img=1100.0, fast_img=2400.0, loss_max=0.004, psnr=40.0):
    env = dict(device="cuda:0", device_name="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", cuda="13.0")
    train = lambda fast, spk: dict(bench="train", env=env, settings=dict(batch=128, fast=fast, precision="fp16"),
                                   s_per_kimg=spk, peak_mem_gb=ours_mem)
    sample = lambda fast, rate: dict(bench="sample", env=env, settings=dict(batch=256, fast=fast, precision="fp16"),
                                     img_per_s_png_off=rate, img_per_s_png_on=rate / 2)
    return [dict(bench="call", date="2026-12-08 10:00 UTC", commit="abc1234", tiny=False, command="OUT=$OUT bash x"),
            dict(what="paper_train", gpu_name="NVIDIA H100 80GB HBM3", batch=128, s_per_kimg=paper_s_per_kimg,
                 peak_mem_gb=paper_mem),
            dict(what="paper_sample_nfe2", gpu_name="NVIDIA H100 80GB HBM3", batch=256, img_per_s=paper_img * 1.01,
                 img_per_s_incl_latents=paper_img),
            train(False, 3.0), train(True, ours_fast), sample(False, fp32_img), sample(True, fast_img),
            dict(bench="equivalence", env=env, settings=dict(kimg=2.0, seeds=256),
                 loss_rel_diff=dict(fast=dict(max=loss_max, median=loss_max / 4), fp16=dict(max=0.002, median=5e-4)),
                 psnr_db=dict(fast_sampling=psnr, fast_trained=30.0))]


def row(report, start):
    found = [line for line in report.splitlines() if line.startswith("| " + start)]
    assert len(found) == 1, (start, report)
    return [cell.strip() for cell in found[0].strip("|").split("|")]


def test_report_puts_ours_beside_the_paper_as_ratios_and_judges_the_targets():
    from benchmarks.report import TARGETS, build

    report = build(paper_and_ours(), pytest=dict(tests=6, failures=0, errors=0, skipped=0, passed=6))
    assert "NVIDIA H100 80GB HBM3" in report and "torch 2.11.0+cu130" in report and "2026-12-08" in report
    assert row(report, "training s/kimg, batch 128, paper setting")[1:5] == ["4", "3", "1.33× faster", "—"]
    assert row(report, "training s/kimg, batch 128, fast path")[1:] == ["4", "1.6", "2.50× faster", "≥ 2.4×", "**yes**"]
    assert row(report, "training peak memory GB, fast path")[3:] == [
        "0.89× the paper's", "≤ 1.0×", "**yes**"]
    assert row(report, "NFE-2 sampling img/s, batch 256, fp32, no PNG")[1:] == ["1000", "1100", "1.10×", "≥ 1.0×",
                                                                               "**yes**"]
    assert row(report, "NFE-2 sampling img/s, batch 256, fast path (precision=fp16), no PNG")[3:] == [
        "2.40×", "≥ 2.5×", "**no**"]
    assert row(report, "fast path per-step losses")[2:] == ["0.004 (0.001)", "—", "≤ 0.01", "**yes**"]
    assert row(report, "fast-path sampled images")[2:] == ["40", "—", "≥ 35 dB", "**yes**"]
    assert row(report, "pytest -m gpu")[2] == "6 passed, 0 failed, 0 skipped"
    # each verdict flips where its target says
    assert row(build(paper_and_ours(ours_fast=4.0 / TARGETS["train_speedup"] * 1.01), None),
               "training s/kimg, batch 128, fast path")[-1] == "**no**"
    assert row(build(paper_and_ours(ours_mem=9.5), None), "training peak memory GB, fast path")[-1] == "**no**"
    assert row(build(paper_and_ours(fp32_img=990.0), None), "NFE-2 sampling img/s, batch 256, fp32, no")[-1] == "**no**"
    assert row(build(paper_and_ours(loss_max=0.011), None), "fast path per-step losses")[-1] == "**no**"
    assert row(build(paper_and_ours(psnr=34.9), None), "fast-path sampled images")[-1] == "**no**"


def test_report_states_what_is_missing_and_refuses_bad_input(tmp_path):
    from benchmarks.report import build

    lines = paper_and_ours()
    lines[1]["gpu_name"] = "NVIDIA H200"
    assert "no ratio holds" in build(lines, None)  # the paper's code on another card
    partial = build([lines[0], dict(bench="step", name="paper", rc="124", seconds=120, cap_s=120, command="x")], None)
    assert "paper (stopped at its 120 s cap)" in partial and "| training s/kimg" in partial
    script = os.path.join(ROOT, "benchmarks", "report.py")
    for args, message in (([str(tmp_path / "none")], "no such folder"), ([str(tmp_path)], "has no bench.jsonl")):
        result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- gpu-report:begin -->\nOLD-TEXT\n<!-- gpu-report:end -->\nrest\n")
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = subprocess.run([sys.executable, script, str(tmp_path), "--readme", str(readme)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert text.startswith("intro\n<!-- gpu-report:begin -->\nMeasured on") and text.endswith("<!-- gpu-report:end -->\nrest\n")
    assert "OLD-TEXT" not in text

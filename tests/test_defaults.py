"""Defaults that follow what the paper ran: the distillation teacher without dynamic thresholding (the paper's
fp16 GPU runs skipped it), the DPM-Solver++ baselines of sample.py with it (the paper's fp32 sampling)."""

import json

import pytest
import torch
from click.testing import CliRunner

import sample
import solvers.dpm_solver_pp as pp
import train


@pytest.fixture
def threshold_calls(monkeypatch):
    calls = []
    real = pp.dynamic_threshold
    monkeypatch.setattr(pp, "dynamic_threshold", lambda x0, *a, **k: calls.append(x0.shape[0]) or real(x0, *a, **k))
    return calls


@pytest.mark.parametrize("args, expected", [([], False), (["--thresholding", "True"], True)])
def test_train_teacher_thresholding_default_off(tmp_path, tiny_teacher_pkl, threshold_calls, args, expected):
    from models import load_snapshot

    pkl, _ = tiny_teacher_pkl
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--model_path", pkl, "--batch", "4",
                                        "--total_kimg", "0.004", "--seed", "1", "--device", "cpu", *args])
    assert r.exit_code == 0, r.output
    (options,) = tmp_path.glob("*/training_options.json")
    assert json.load(open(options))["thresholding"] is expected
    (snapshot,) = tmp_path.glob("*/network-snapshot-*.safetensors")
    assert load_snapshot(str(snapshot))[1]["thresholding"] is expected  # the setting the run stores
    # One iteration, 13 teacher points with M=3: 12 data predictions of the DPM-Solver++ teacher.
    assert len(threshold_calls) == (12 if expected else 0)


@pytest.mark.parametrize("args, expected", [([], True), (["--thresholding", "False"], False)])
def test_sample_dpmpp_baseline_thresholding_default_on(tmp_path, tiny_teacher_pkl, threshold_calls, args, expected):
    pkl, _ = tiny_teacher_pkl
    r = CliRunner().invoke(sample.main, ["--model_path", pkl, "--solver", "dpmpp", "--num_steps", "6", "--seeds",
                                         "0-1", "--outdir", str(tmp_path), "--device", "cpu", *args])
    assert r.exit_code == 0, r.output
    assert len(threshold_calls) == (5 if expected else 0)  # 6 time points: 5 data predictions
    assert len(list(tmp_path.rglob("*.png"))) == 2


def test_training_loop_from_python_distils_as_train_py_does_with_the_same_options(tmp_path, tiny_teacher_pkl,
                                                                                   threshold_calls):
    """One default per option (training.config.DistillConfig): training_loop() given only the options written on
    train.py's command line trains the same student, with the same teacher (no thresholding), and stores the same
    settings."""
    from models import load_snapshot
    from training.training_loop import training_loop

    pkl, _ = tiny_teacher_pkl
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--model_path", pkl, "--batch", "4",
                                        "--total_kimg", "0.004", "--seed", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    (snapshot,) = tmp_path.glob("*/network-snapshot-*.safetensors")
    net, settings = load_snapshot(str(snapshot))
    assert settings["thresholding"] is False and threshold_calls == []
    res = training_loop(model_path=pkl, batch_size=4, total_kimg=0.004, seed=1, device="cpu", progress=False)
    assert threshold_calls == []  # the loop's teacher runs without thresholding too
    assert res.settings == settings
    for key, value in net.state_dict().items():
        assert torch.equal(res.net.state_dict()[key], value), key


def test_train_help_says_why_thresholding_is_off():
    r = CliRunner().invoke(train.main, ["--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    option = text[text.index("--thresholding"):]
    option = option[:option.index(" --", 2)]
    assert "[default: False]" in option and "fp16" in option, option


@pytest.fixture
def tf32_on():
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield torch.backends
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_training_and_sampling_switch_tf32_off(tmp_path, tiny_teacher_pkl, tf32_on):
    from training.training_loop import training_loop

    training_loop(model_path=tiny_teacher_pkl[0], batch_size=4, total_kimg=0.004, device="cpu", progress=False)
    assert not tf32_on.cuda.matmul.allow_tf32 and not tf32_on.cudnn.allow_tf32
    tf32_on.cuda.matmul.allow_tf32 = tf32_on.cudnn.allow_tf32 = True
    r = CliRunner().invoke(sample.main, ["--model_path", tiny_teacher_pkl[0], "--seeds", "0", "--num_steps", "3",
                                         "--device", "cpu", "--outdir", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert not tf32_on.cuda.matmul.allow_tf32 and not tf32_on.cudnn.allow_tf32


@pytest.mark.parametrize("script, args", [
    ("fmnist_table", ["--table_only", "--num", "6"]),
    ("fmnist_metric", ["--sets", "nosuchset"]),
    ("fmnist_teacher_curve", ["--run", "no-such-run"]),
    ("quickstart_report", ["--student", "no-such-student"]),
])
def test_experiment_scripts_switch_tf32_off_before_anything_else(tmp_path, monkeypatch, tf32_on, script, args):
    """Their rows are compared across machines (H200 baselines beside CPU students): fp32 there too."""
    import importlib

    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"experiments.{script}")
    r = CliRunner().invoke(module.main, args + ["--device", "cpu"] + (
        ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "t.md")] if script == "fmnist_table" else []))
    assert "Traceback" not in r.output, r.output
    assert not tf32_on.cuda.matmul.allow_tf32 and not tf32_on.cudnn.allow_tf32

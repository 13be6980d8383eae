"""sample.py: every option reaches the code it names, and --help's defaults are the ones that run (issue 50).

The sampler, the precision mode, the memory-format switch and torch.compile are wrapped by recorders; what is
checked is what sample.py hands them for a tiny pre-trained EDM pickle."""

import os

import pytest
import torch
from click.testing import CliRunner

import sample
import solvers
from models.registry import EDM_SIGMA_MAX, PAPER_SIGMA_MIN
from tests.conftest import CallRecorder, documented_defaults

# Options covered by other tests: text models (tests/test_sd.py), the model choice and its checks
# (tests/test_sample.py), in-process FID and --no-save (tests/test_sample.py::test_in_process_fid_equals_png_route).
ELSEWHERE = {"prompt", "captions", "dataset_name", "model_path", "exps_dir", "fid_ref", "detector", "save_images",
             "outdir"}  # --outdir: every run here writes to the one it gives; its default: tests/test_sample.py


@pytest.fixture
def sampled(tmp_path, tiny_teacher_pkl, monkeypatch):
    """Run sample.py on the tiny pickle with the given options; return what reached the sampler and the switches."""
    def run(args, outdir="out"):
        rec = CallRecorder(monkeypatch)
        calls = {}
        for name in list(solvers.SOLVERS):
            real = solvers.SOLVERS[name]

            def recording(net, latents, _name=name, _real=real, **kwargs):
                calls.setdefault("sampler", []).append(dict(kwargs, solver=_name, batch=len(latents)))
                return _real(net, latents, **kwargs)

            monkeypatch.setitem(solvers.SOLVERS, name, recording)
        rec.wrap(sample, "RunMode")
        rec.wrap(sample, "prepare_module")
        rec.wrap(sample, "maybe_compile", replace=lambda fn, enabled: fn)  # recorded, not compiled
        out = str(tmp_path / outdir)
        r = CliRunner().invoke(sample.main, ["--model_path", tiny_teacher_pkl[0], "--outdir", out, *args])
        assert r.exit_code == 0, r.output
        first = calls["sampler"][0]
        seen = {k: first[k] for k in ("solver", "num_steps", "afs", "schedule_type", "schedule_rho", "sigma_min",
                                      "sigma_max", "denoise_to_zero")}
        table = solvers.TABLE[first["solver"]].options
        seen["options"] = {k: first.get(k, default) for k, default in table.items()}
        seen["batches"] = [c["batch"] for c in calls["sampler"]]
        seen["precision"] = rec.calls["RunMode"][0]["precision"]
        seen["channels_last"] = rec.calls["prepare_module"][0]["channels_last"]
        seen["compile"] = rec.calls["maybe_compile"][0]["enabled"]
        seen["files"] = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
                               if f.endswith(".png"))
        return seen

    return run


WIRING = [
    (["--seeds", "3-5", "--batch", "2"], dict(batches=[2, 1], files=["000000/000003.png", "000000/000004.png",
                                                                     "000000/000005.png"])),
    (["--seeds", "1002", "--subdirs", "False"], dict(files=["001002.png"])),
    (["--seeds", "0-2", "--grid"], dict(files=["grid.png"])),
    (["--num_steps", "5"], dict(num_steps=5)),
    (["--afs", "True"], dict(afs=True)),
    (["--schedule_type", "logsnr"], dict(schedule_type="logsnr")),
    (["--schedule_rho", "3"], dict(schedule_rho=3.0)),
    (["--sigma_min", "0.01", "--sigma_max", "50"], dict(sigma_min=0.01, sigma_max=50.0)),
    (["--denoise_to_zero", "True"], dict(denoise_to_zero=True)),
    (["--solver", "heun"], dict(solver="heun")),
    (["--solver", "ipndm", "--max_order", "2"], dict(solver="ipndm", options=dict(max_order=2))),
    (["--solver", "dpmpp", "--predict_x0", "False"], dict(solver="dpmpp", options=dict(
        max_order=3, predict_x0=False, lower_order_final=True, thresholding=True))),
    (["--solver", "dpmpp", "--lower_order_final", "False", "--thresholding", "False"], dict(solver="dpmpp", options=dict(
        max_order=3, predict_x0=True, lower_order_final=False, thresholding=False))),
    (["--precision", "bf16"], dict(precision="bf16")),  # RunMode applies it on CUDA only
    (["--channels_last", "True", "--compile", "True"], dict(channels_last=True, compile=True)),
    (["--device", "cpu"], dict()),
]


@pytest.mark.parametrize("args, expected", WIRING, ids=[" ".join(a[::2]) for a, _ in WIRING])
def test_each_option_reaches_the_code_it_names(sampled, args, expected):
    seen = sampled(["--seeds", "0-1", *args] if "--seeds" not in args else args)
    assert {k: seen[k] for k in expected} == expected


def test_every_option_is_in_the_wiring_table():
    flags = {a for args, _ in WIRING for a in args if a.startswith("--")}
    for param in sample.main.params:
        if param.name in ELSEWHERE or param.name == "help":
            continue
        assert set(param.opts + param.secondary_opts) & flags, f"add {param.opts[0]} to WIRING"


def test_documented_defaults_are_the_ones_that_run(sampled):
    documented = documented_defaults(sample.main)
    seen = sampled([])
    # The defaults --help states, against what ran: 64 seeds in one batch of 64, one PNG per seed in 000000/.
    assert documented.pop("--seeds") == "0-63" and documented.pop("--batch") == "64" and seen["batches"] == [64]
    assert documented.pop("--subdirs") == "True" and documented.pop("--grid") == "False"
    assert documented.pop("--save") == "save" and seen["files"] == [f"000000/{s:06d}.png" for s in range(64)]
    assert documented.pop("--num_steps") == "the snapshot's / 18" and seen["num_steps"] == 18
    assert documented.pop("--afs") == "False" and seen["afs"] is False
    assert documented.pop("--denoise_to_zero") == "False" and seen["denoise_to_zero"] is False
    assert documented.pop("--sigma_min") == documented.pop("--sigma_max") == "the backbone's"
    assert (seen["sigma_min"], seen["sigma_max"]) == (PAPER_SIGMA_MIN, EDM_SIGMA_MAX)  # a bare EDM pickle
    assert documented.pop("--thresholding") == "True"
    assert sampled(["--seeds", "0", "--solver", "dpmpp"])["options"]["thresholding"] is True
    assert documented.pop("--precision") == "fp32" and seen["precision"] == "fp32"
    assert documented.pop("--channels_last") == "False" and seen["channels_last"] is False
    assert documented.pop("--compile") == "False" and seen["compile"] is False
    assert documented.pop("--device") == "cuda if available"
    assert seen["solver"] == "euler" and seen["schedule_type"] == "polynomial" and seen["schedule_rho"] == 7.0
    for option in ("--exps_dir", "--outdir", "--prompt", "--detector"):  # tests/test_sample.py, tests/test_sd.py
        documented.pop(option)
    assert documented == {}, "a documented default without a check here"

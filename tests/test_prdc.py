"""PRDC: precision, recall, density, coverage on constructed features, and prdc.py end to end."""

import re

import numpy as np
import pytest
import scipy.spatial.distance
import torch
from click.testing import CliRunner

import fid
import prdc  # the CLI in the repository root
from metrics.prdc import compute_prdc, knn_sq_radii
from tests.conftest import CallRecorder, assert_one_line_refusal, documented_defaults, torchrun
from tests.test_fid import (URL_DETECTOR, bad_inputs, random_images, refused, save_detector,  # noqa: F401
                            write_pngs)

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")


def brute_force_prdc(real, fake, k):
    """Reference: full distance matrices with scipy, the definitions of Naeem et al. read literally."""
    d_rr = scipy.spatial.distance.cdist(real, real)
    d_ff = scipy.spatial.distance.cdist(fake, fake)
    d_fr = scipy.spatial.distance.cdist(fake, real)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    inside = d_fr <= r_real[None, :]
    return dict(
        precision=inside.any(1).mean(),
        recall=(d_fr <= r_fake[:, None]).any(0).mean(),
        density=inside.sum() / (k * len(fake)),
        coverage=(d_fr.min(0) <= r_real).mean(),
    )


def test_identical_sets_are_fully_precise_recalled_and_covered():
    x = np.random.RandomState(0).randn(200, 16)
    s = compute_prdc(x, x.copy(), nearest_k=5)
    assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["coverage"] == 1.0
    assert s["density"] > 0.5


def test_far_disjoint_sets_score_zero():
    rng = np.random.RandomState(1)
    real = rng.randn(100, 8)
    fake = rng.randn(120, 8) + 100.0
    s = compute_prdc(real, fake, nearest_k=3)
    assert s == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)


def test_hand_checked_one_dimensional_case():
    # k = 1. Real {0, 1, 2, 4}: radii 1, 1, 1, 2. Fake {0.4, 0.6, 3.5, 9}: radii 0.2, 0.2, 2.9, 5.5.
    # precision: 0.4 (ball of 0), 0.6 (ball of 1), 3.5 (ball of 4, d=0.5 <= 2) inside; 9 not -> 3/4.
    # recall: real 0 is in no fake ball (0.4 > 0.2, 0.6 > 0.2, 3.5 > 2.9, 9 > 5.5); 1 and 2 are in
    #         the ball of 3.5 (2.5, 1.5 <= 2.9); 4 too -> 3/4.
    # density: 0.4 lies in the balls of 0 and 1, 0.6 too, 3.5 in that of 4 only, 9 in none -> 5/(1*4).
    # coverage: nearest fakes of 0, 1, 4 are within 1, 1, 2 (0.4, 0.4, 0.5); of 2 it is 1.4 > 1 -> 3/4.
    real = np.array([[0.0], [1.0], [2.0], [4.0]])
    fake = np.array([[0.4], [0.6], [3.5], [9.0]])
    expected = dict(precision=0.75, recall=0.75, density=1.25, coverage=0.75)
    for block_rows in (None, 1, 3):
        s = compute_prdc(real, fake, nearest_k=1, block_rows=block_rows)
        assert s == pytest.approx(expected, abs=1e-12), block_rows


def test_matches_brute_force_reference_in_blocks():
    rng = np.random.RandomState(2)
    real = rng.randn(150, 10)
    fake = rng.randn(130, 10) * 1.3 + 0.3
    expected = brute_force_prdc(real, fake, k=5)
    for block_rows in (None, 7, 64):
        assert compute_prdc(real, fake, nearest_k=5, block_rows=block_rows) == pytest.approx(expected, abs=1e-12)


def test_knn_radius_counts_duplicates_and_validates_k():
    x = np.array([[0.0], [0.0], [3.0]])
    np.testing.assert_allclose(knn_sq_radii(torch.tensor(x), 1).numpy(), [0.0, 0.0, 9.0])
    with pytest.raises(ValueError, match="nearest_k"):
        compute_prdc(np.zeros([3, 2]), np.ones([4, 2]), nearest_k=3)
    with pytest.raises(ValueError, match="features must be"):
        compute_prdc(np.zeros([5, 2]), np.ones([5, 3]), nearest_k=2)


def _scores(output):
    return {k: float(v) for k, v in re.findall(r"(precision|recall|density|coverage): (\S+)", output)}


def test_cli_same_and_different_folders(tmp_path):
    det = save_detector(tmp_path / "tiny.pt")
    a = write_pngs(tmp_path / "a", random_images(30, seed=1))
    far = write_pngs(tmp_path / "far", random_images(30, seed=2, lo=250, hi=256))
    common = ["--detector", det, "--workers", "0", "--nearest_k", "3"]
    r = CliRunner().invoke(prdc.main, ["calc", "--images", a, "--images_ref", a] + common)
    assert r.exit_code == 0, r.output
    s = _scores(r.output)
    assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["coverage"] == 1.0
    r = CliRunner().invoke(prdc.main, ["calc", "--images", far, "--images_ref", a, "--num", "20"] + common)
    assert r.exit_code == 0, r.output
    s = _scores(r.output)
    assert s == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)
    r = CliRunner().invoke(prdc.main, ["calc", "--images", a, "--images_ref", a, "--nearest_k", "30",
                                       "--detector", det, "--workers", "0"])
    assert r.exit_code == 2 and "--nearest_k" in r.output


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    det = save_detector(tmp_path / "tiny.pt")
    a = write_pngs(tmp_path / "a", random_images(25, seed=3))  # odd counts: ranks hold 13 and 12
    b = write_pngs(tmp_path / "b", random_images(23, seed=4, lo=30))
    args = ["calc", "--images", b, "--images_ref", a, "--detector", det, "--workers", "0", "--batch", "4"]
    single = CliRunner().invoke(prdc.main, args)
    assert single.exit_code == 0, single.output
    p = torchrun("prdc.py", *args, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("precision:") == 1
    assert _scores(p.stdout) == _scores(single.output) and len(_scores(single.output)) == 4


def test_offline_detector_download_exits_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_OFFLINE", "1")
    a = write_pngs(tmp_path / "a", random_images(5, seed=1))
    r = CliRunner().invoke(prdc.main, ["calc", "--images", a, "--images_ref", a, "--workers", "0", "--nearest_k", "2",
                                       "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 2, r.output
    assert "inception-2015-12-05.pkl" in r.output and len(r.output.strip().splitlines()) <= 2, r.output


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a detector loads, a download starts, an image is decoded or features are computed."""
    import dnnlib
    import fid
    from metrics import images as image_io

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(fid, "load_detector_rank0_first", forbidden)
    monkeypatch.setattr(prdc, "iterate_features", forbidden)
    monkeypatch.setattr(image_io.ImageFiles, "read", forbidden)
    monkeypatch.setattr(dnnlib.util, "download_file", forbidden)
    monkeypatch.setattr(prdc.dist, "init", forbidden)


CALC = ["calc", "--images", "{imgs}", "--images_ref", "{imgs}", "--detector", "{det}", "--workers", "0",
        "--device", "cpu", "--nearest_k", "2"]


@pytest.mark.parametrize("args, words", [
    # bad paths
    (["--images", "{missing}"], ["--images", "no such folder"]),
    (["--images", "{txt}"], ["--images", "neither a folder nor a zip"]),
    (["--images_ref", "{missing}"], ["--images_ref", "no such folder"]),
    (["--images_ref", "{dir}"], ["--images_ref", "no PNG/JPG images"]),
    (["--detector", "{missing}"], ["--detector", "no such file"]),
    (["--detector", "{dir}"], ["--detector", "is a folder"]),
    (["--detector", "{txt}"], ["--detector", "unknown format"]),
    (["--detector", URL_DETECTOR, "--cache", "{blocker}"], ["--cache", "is a file"]),
    # bad devices
    (["--device", "tpu"], ["--device", "not a device"]),
    (["--device", "cuda:99"], ["--device", "cuda:99"]),
    # bad ranges
    (["--nearest_k", "0"], ["--nearest_k", "not in the range"]),
    (["--nearest_k", "4"], ["--images", "4 images are too few for --nearest_k=4"]),  # k >= the 4 images
    (["--num", "1"], ["--num", "not in the range"]),
    (["--batch", "0"], ["--batch", "not in the range"]),
    (["--workers", "-1"], ["--workers", "not in the range"]),
    # contradictory options
    (["--nearest_k", "5", "--num", "5"], ["--nearest_k", "--num=5 keeps at most 5"]),
])
def test_calc_refuses_bad_options_before_any_work(bad_inputs, no_work, args, words):
    root, paths = bad_inputs
    assert_one_line_refusal(refused(prdc.main, CALC, args, paths, root), *words)


def test_help_names_device_and_workers_default():
    r = CliRunner().invoke(prdc.main, ["calc", "--help"])
    assert r.exit_code == 0
    flat = " ".join(r.output.split())
    assert "--device" in flat and "cuda if this machine has it, else cpu" in flat
    assert "min(3, CPU cores available - 1)" in flat


# ---------------------------------------------------------------------------------------------------------------------
# Every option reaches the code it names, and the defaults --help documents are the ones that run.

PAPER_NEAREST_K = 5  # the paper's prdc.py passes nearest_k=5 to compute_prdc (Naeem et al.'s setting)


@pytest.fixture(scope="module")
def two_sides(tmp_path_factory):
    """7 generated and 9 reference images (different counts tell the sides apart) and a tiny detector."""
    d = tmp_path_factory.mktemp("prdc-wiring")
    return dict(gen=write_pngs(d / "gen", random_images(7, seed=1)),
                ref=write_pngs(d / "ref", random_images(9, seed=2)), det=save_detector(d / "tiny.pt"))


def observed_calc(monkeypatch, sides, extra):
    """Run `prdc.py calc` on the two folders and return what reached each stage of the computation."""
    rec = CallRecorder(monkeypatch)
    opened = rec.wrap(prdc, "open_images")
    loaded = rec.wrap(prdc, "get_detector")
    featured = rec.wrap(prdc, "image_features")
    scored = rec.wrap(prdc, "compute_prdc", replace=lambda *args, **kwargs: dict.fromkeys(
        ("precision", "recall", "density", "coverage"), 0.0))
    args = ["calc", "--images", sides["gen"], "--images_ref", sides["ref"], "--detector", sides["det"]] + extra
    r = CliRunner().invoke(prdc.main, args)
    assert r.exit_code == 0, r.output
    (score,) = scored
    sides_opened = {call["option"]: call for call in opened}
    return {
        "--images": sides_opened["--images"]["path"], "--images_ref": sides_opened["--images_ref"]["path"],
        "real rows": len(score["real_features"]), "fake rows": len(score["fake_features"]),
        "--nearest_k": score["nearest_k"],
        "--num": {c["num"] for c in opened}, "--seed": {c["seed"] for c in opened},
        "--detector": loaded[0]["spec"], "--cache": loaded[0]["cache"], "--device": str(loaded[0]["device"]),
        "--batch": {c["batch"] for c in featured}, "--workers": {c["num_workers"] for c in featured},
    }


@pytest.mark.parametrize("extra, expected", [
    ([], {"--nearest_k": PAPER_NEAREST_K, "--num": {10000}, "--seed": {0}, "--batch": {64}, "--cache": "./src",
          "--device": "cpu", "--workers": {prdc.default_workers()}}),
    (["--nearest_k", "3"], {"--nearest_k": 3}),
    (["--num", "8", "--seed", "4"], {"--num": {8}, "--seed": {4}, "real rows": 8, "fake rows": 7}),
    (["--batch", "3", "--workers", "1", "--device", "cpu", "--cache", "elsewhere"],
     {"--batch": {3}, "--workers": {1}, "--device": "cpu", "--cache": "elsewhere"}),
])
def test_calc_options_reach_the_computation(two_sides, monkeypatch, extra, expected):
    seen = observed_calc(monkeypatch, two_sides, extra)
    # The generated folder is the fake side and the reference folder the real one (precision and recall swap
    # if they are crossed), whatever else the options say.
    assert (seen["--images"], seen["--images_ref"]) == (two_sides["gen"], two_sides["ref"])
    assert seen["--detector"] == two_sides["det"]
    if "real rows" not in expected:
        assert (seen["real rows"], seen["fake rows"]) == (9, 7), seen
    assert {k: seen[k] for k in expected} == expected, seen


def test_documented_defaults_are_the_ones_that_run(two_sides, monkeypatch):
    documented = documented_defaults(prdc.main, "calc")
    assert documented["--nearest_k"] == str(PAPER_NEAREST_K)
    # Without --detector the NVIDIA detector that --help names is downloaded (offline here; tests/test_fid.py).
    assert fid.DEFAULT_DETECTOR_URL.endswith("/inception-2015-12-05.pkl")
    assert "inception-2015-12-05.pkl" in documented.pop("--detector")
    seen = observed_calc(monkeypatch, two_sides, [])
    for option, value in documented.items():
        if option == "--workers":  # documented as a rule: 'min(3, CPU cores available - 1), here N'
            assert value.endswith(f"here {seen[option].pop()}"), value
        elif option == "--device":
            assert value == "cuda if this machine has it, else cpu" and seen[option] == "cpu"
        else:
            shown = seen[option]
            shown = shown.pop() if isinstance(shown, set) and len(shown) == 1 else shown
            assert str(shown) == value, (option, value, seen[option])

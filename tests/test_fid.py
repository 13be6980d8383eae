"""FID: Fréchet distance math, feature statistics, detector loading and the fid.py CLI end to end."""

import io
import os
import pickle
import re
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import fid
from metrics import detectors, frechet, images as image_io
from tests.conftest import CallRecorder, assert_one_line_refusal, documented_defaults, torchrun, tree

# torch >= 2.10 flags TorchScript as deprecated; it is still the detector file format we accept.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")


# ----------------------------------------------------------------------------------------------
# A tiny feature network built here: fixed random conv + global pooling, uint8 NCHW in.


class TinyDetector(torch.nn.Module):
    def __init__(self, in_channels: int = 3, dim: int = 6, seed: int = 0):
        super().__init__()
        self.in_channels = in_channels
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(in_channels, dim, 3)

    def forward(self, x, return_features: bool = False):
        x = x.to(torch.float32) / 127.5 - 1.0
        # Pooled random-conv responses plus the per-channel means, so brightness shifts register.
        return torch.cat([torch.tanh(self.conv(x)).mean(dim=[2, 3]), x.mean(dim=[2, 3])], dim=1)


def save_detector(path, in_channels=3):
    torch.jit.script(TinyDetector(in_channels)).save(str(path))
    return str(path)


def write_pngs(folder, arrays):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        PIL.Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(os.path.join(folder, f"{i:06d}.png"))
    return str(folder)


def random_images(n, seed, lo=0, hi=256, size=8, channels=3):
    rng = np.random.RandomState(seed)
    return rng.randint(lo, hi, size=[n, size, size, channels]).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    a = random_images(40, seed=1)
    b = random_images(40, seed=2, lo=40, hi=256)
    folder_a = write_pngs(d / "a", a)
    folder_b = write_pngs(d / "b", b)
    zip_a = str(d / "a.zip")
    with zipfile.ZipFile(zip_a, "w") as z:
        for name in sorted(os.listdir(folder_a)):
            z.write(os.path.join(folder_a, name), arcname=f"sub/{name}")
    det = save_detector(d / "tiny.pt")
    return dnnlib.EasyDict(dir=d, a=a, b=b, folder_a=folder_a, folder_b=folder_b, zip_a=zip_a, det=det)


def run_cli(args):
    result = CliRunner().invoke(fid.main, args)
    return result


def parse_fid(output):
    values = re.findall(r"FID: (\S+)", output)
    assert len(values) == 1, output
    return float(values[0])


# ----------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def random_spd(rng, d):
    a = rng.randn(d, 2 * d)
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_frechet_distance_matches_independent_eigen_computation():
    rng = np.random.RandomState(0)
    d = 12
    mu1, mu2 = rng.randn(d), rng.randn(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2): a symmetric PSD matrix, so eigh suffices.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_analytic():
    # For diagonal covariances the distance is |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    shift = np.array([3.0, 0.0, -1.0])
    expected = 10.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet.frechet_distance(np.zeros(3), np.diag(a), shift, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def _whitened(rng, n, d):
    """Gaussian samples transformed to have sample mean exactly 0 and sample covariance exactly I."""
    z = rng.randn(n, d)
    z -= z.mean(0)
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    return z @ np.linalg.inv(chol).T


def test_shifted_gaussians_give_analytic_value_through_feature_stats():
    rng = np.random.RandomState(0)
    shift, scale = np.array([1.0, -2.0, 0.5, 0.0]), np.array([2.0, 1.0, 1.0, 3.0])
    x1 = _whitened(rng, 5000, 4)
    x2 = _whitened(rng, 3000, 4) * scale + shift  # N(shift, diag(scale^2)) in sample statistics
    s1, s2 = frechet.FeatureStats(), frechet.FeatureStats()
    for chunk in np.array_split(x1, 7):
        s1.add(chunk)
    for chunk in np.array_split(x2, 3):
        s2.add(torch.from_numpy(chunk))
    expected = np.sum(shift**2) + np.sum((1.0 - scale) ** 2)  # |dmu|^2 + sum (sqrt(1) - sqrt(scale^2))^2
    assert frechet.frechet_distance(*s1.mean_cov(), *s2.mean_cov()) == pytest.approx(expected, rel=1e-9)


def test_feature_stats_equal_numpy_mean_and_unbiased_cov():
    rng = np.random.RandomState(3)
    x = rng.randn(103, 5) * [1, 2, 3, 4, 5] + 7
    stats = frechet.FeatureStats()
    for chunk in np.array_split(x, [1, 50, 51]):
        stats.add(chunk)
    mu, sigma = stats.mean_cov()
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.all_reduce().num == 103  # single process: the totals are its own
    with pytest.raises(ValueError, match="differs"):
        stats.add(np.zeros([2, 4]))
    one = frechet.FeatureStats()
    one.add(np.zeros([1, 3]))
    with pytest.raises(ValueError, match="at least 2"):
        one.mean_cov()


def test_frechet_distance_is_exactly_0_for_identical_statistics_and_never_negative():
    for seed in range(6):
        x = np.random.RandomState(seed).randn(50, 16)
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        # Through sqrtm these leave -4.6e-14 (seed 0) or +7.1e-15 (seed 3) of rounding.
        assert frechet.frechet_distance(mu, sigma, mu.copy(), sigma.copy()) == 0.0
        assert f"{frechet.frechet_distance(mu, sigma, mu, sigma):.6g}" == "0"
        # The same features summed in the other order: statistics equal up to rounding, which leaves a tiny
        # negative value here (seeds 0, 1, 4, 5); the distance is clamped at 0.
        other = np.cov(x[::-1], rowvar=False)
        assert not np.array_equal(other, sigma)
        assert 0.0 <= frechet.frechet_distance(mu, sigma, mu, other) < 1e-9


def test_frechet_distance_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="same feature detector"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_load_ref_refuses_broken_files_in_one_line(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, mu=np.zeros(3), sigma=np.eye(3))
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:200])
    np.save(tmp_path / "array.npy", np.zeros(3))
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
    np.savez(tmp_path / "matrix_mu.npz", mu=np.zeros([3, 3]), sigma=np.eye(3))
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    np.savez(tmp_path / "text.npz", mu=np.array(["a"]), sigma=np.array([["b"]]))
    for name, words in [("empty.npz", "not a readable .npz file (EOFError"),
                        ("truncated.npz", "not a readable .npz file (BadZipFile"),
                        ("array.npy", "not an .npz archive"),
                        ("shapes.npz", "mu [3] and sigma [4, 4] are not the shapes"),
                        ("matrix_mu.npz", "mu [3, 3] and sigma [3, 3] are not the shapes"),
                        ("nan.npz", "NaN"),
                        ("text.npz", "must be numbers")]:
        with pytest.raises(ValueError) as e:
            frechet.load_ref(str(tmp_path / name))
        assert words in str(e.value) and len(str(e.value).splitlines()) == 1, (name, str(e.value))


def test_save_ref_is_atomic_and_load_ref_checks_keys(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    dest = tmp_path / "deep" / "ref.npz"
    frechet.save_ref(dest, mu, sigma)
    assert sorted(os.listdir(dest.parent)) == ["ref.npz"]  # no temporary file left behind
    mu2, sigma2 = frechet.load_ref(str(dest))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        frechet.load_ref(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        frechet.load_ref(str(tmp_path / "missing.npz"))


# ----------------------------------------------------------------------------------------------
# Detectors


def test_default_detector_offline_fails_fast_and_names_url_and_folder(tmp_path):
    start = time.time()
    with pytest.raises(dnnlib.util.DownloadError) as e:
        detectors.load_detector(None, cache_root=str(tmp_path))
    msg = str(e.value)
    assert "inception-2015-12-05.pkl" in msg and detectors.DEFAULT_DETECTOR_URL in msg
    assert os.path.join(str(tmp_path), "metrics") in msg
    assert time.time() - start < 10


def test_grayscale_is_repeated_for_rgb_detector_and_kept_for_gray_detector(setup, tmp_path):
    rgb = detectors.load_detector(setup.det)
    gray = torch.from_numpy(random_images(5, seed=4, channels=1)).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(
        detectors.compute_features(rgb, gray).numpy(), detectors.compute_features(rgb, gray.repeat(1, 3, 1, 1)).numpy()
    )
    det1 = detectors.load_detector(save_detector(tmp_path / "gray.pt", in_channels=1))
    assert detectors.detector_in_channels(det1) == 1 and detectors.detector_in_channels(rgb) == 3
    assert detectors.compute_features(det1, gray).shape == (5, 7)
    with pytest.raises(ValueError, match="1-channel"):
        detectors.compute_features(det1, gray.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="uint8"):
        detectors.compute_features(rgb, gray.float())


def test_detector_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        detectors.load_detector(str(tmp_path / "none.pt"))
    not_script = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, not_script)
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        detectors.load_detector(str(not_script))
    with pytest.raises(ValueError, match="unknown format"):
        (tmp_path / "x.onnx").write_bytes(b"0")
        detectors.load_detector(str(tmp_path / "x.onnx"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_detector_refuses_unknown_globals(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ValueError, match="does not allow"):
        detectors.load_detector(str(path), trust_embedded_code=True)


def pickle_naming(qualified_name, *call_args):
    """A pickle whose only global is exactly `qualified_name`, called with string arguments or left bare."""
    module, name = qualified_name.rsplit(".", 1)
    value = b"c" + f"{module}\n{name}\n".encode()
    if call_args:
        value += b"(" + b"".join(b"V" + a.encode("raw_unicode_escape") + b"\n" for a in call_args) + b"tR"
    return b"\x80\x02" + value + b"."


# torch callables that are not torch.nn.Module classes: the detector reader must refuse every one.
NON_MODULE_TORCH_CALLABLES = [
    "torch.load", "torch.save", "torch.hub.load", "torch.jit.load", "torch.serialization.load",
    "torch.nn.modules.module.register_module_forward_hook", "torch.nn.modules.module.register_module_forward_pre_hook",
    "torch.nn.modules.utils._pair", "torch.nn.modules.conv.F", "torch.nn.functional.linear",
]


@pytest.mark.parametrize("qualified_name", NON_MODULE_TORCH_CALLABLES)
def test_pickle_detector_refuses_torch_callables_that_are_not_modules(tmp_path, qualified_name):
    marker = tmp_path / "marker"
    path = tmp_path / "det.pkl"
    for data in (pickle_naming(qualified_name, "ran", str(marker)), pickle_naming(qualified_name)):
        path.write_bytes(data)
        for trust in (False, True):
            with pytest.raises(ValueError, match=re.escape(f"refers to {qualified_name}, which the detector loader "
                                                           "does not allow")):
                detectors.load_detector(str(path), trust_embedded_code=trust)
    assert not marker.exists()


def test_pickle_detector_still_takes_plain_torch_modules(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    path = tmp_path / "det.pkl"
    path.write_bytes(pickle.dumps(net))
    loaded = detectors.load_detector(str(path))
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_pickle_carrying_torchscript_archive_is_loaded_with_jit(setup, tmp_path):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.load(setup.det), buf)
    path = tmp_path / "wrapped.pkl"
    path.write_bytes(pickle.dumps({"detector": buf.getvalue()}))
    det = detectors.load_detector(str(path))
    x = torch.from_numpy(setup.a[:4]).permute(0, 3, 1, 2)
    ref = detectors.compute_features(detectors.load_detector(setup.det), x)
    np.testing.assert_array_equal(detectors.compute_features(det, x).numpy(), ref.numpy())


PERSISTENT_SRC = '''
import torch
from torch_utils import persistence

@persistence.persistent_class
class EmbeddedDetector(torch.nn.Module):
    def forward(self, x, return_features=False):
        return self.lin(x.float().mean(dim=[2, 3]))
'''


def _persistence_pickle(monkeypatch, state):
    """Bytes in the format of EDM/stylegan3 torch_utils.persistence (global
    torch_utils.persistence._reconstruct_persistent_obj called with a meta dict)."""
    import types

    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only used to name the global")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", fake)
    import torch_utils

    monkeypatch.setattr(torch_utils, "persistence", fake, raising=False)
    meta = dict(type="class", version=6, module_src=PERSISTENT_SRC, class_name="EmbeddedDetector", state=state)

    class Record:
        def __reduce__(self):
            return (_reconstruct_persistent_obj, (meta,))

    return pickle.dumps(Record(), protocol=4)


def test_persistence_pickle_runs_embedded_source_only_when_trusted(tmp_path, monkeypatch):
    lin = torch.nn.Linear(3, 4)
    holder = torch.nn.Module()
    holder.lin = lin
    data = _persistence_pickle(monkeypatch, dict(holder.__dict__))
    monkeypatch.undo()
    before = sys.modules.get("torch_utils.persistence")
    path = tmp_path / "embedded.pkl"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="embeds Python source"):
        detectors.load_detector(str(path))
    det = detectors.load_detector(str(path), trust_embedded_code=True)
    assert type(det).__name__ == "EmbeddedDetector"
    x = torch.randint(0, 256, [2, 3, 5, 5], dtype=torch.uint8)
    expected = lin(x.float().mean(dim=[2, 3]))
    torch.testing.assert_close(detectors.compute_features(det, x), expected.double())
    assert sys.modules.get("torch_utils.persistence") is before  # the import stub was removed again


# ----------------------------------------------------------------------------------------------
# Image folders


def test_image_folder_errors(tmp_path, setup):
    with pytest.raises(image_io.ImageSourceError, match="no such folder"):
        image_io.ImageFiles(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(image_io.ImageSourceError, match="no PNG/JPG"):
        image_io.ImageFiles(str(tmp_path / "empty"))
    mixed = write_pngs(tmp_path / "mixed", list(random_images(3, 0)) + list(random_images(1, 0, size=6)))
    imgs = image_io.ImageFiles(mixed)
    with pytest.raises(image_io.ImageSourceError, match="mixed image sizes"):
        list(image_io.iterate_images(imgs, batch_size=2))
    z = image_io.ImageFiles(setup.zip_a)
    assert len(z) == 40 and z.is_zip
    np.testing.assert_array_equal(z[3].numpy(), setup.a[3].transpose(2, 0, 1))


def test_rank_batches_cover_every_item_once():
    for n, batch, world in [(40, 7, 2), (3, 64, 4), (65, 8, 3)]:
        per_rank = [image_io.rank_batches(n, batch, r, world) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
        flat = sorted(i for rank in per_rank for b in rank for i in b)
        assert flat == list(range(n))
        assert max(len(b) for rank in per_rank for b in rank) <= batch


def test_subset_selection_is_seeded_and_sorted():
    a = image_io.select_indices(100, 10, seed=5)
    assert list(a) == sorted(a) and len(set(a)) == 10
    assert list(a) == list(image_io.select_indices(100, 10, seed=5))
    assert list(a) != list(image_io.select_indices(100, 10, seed=6))
    assert list(image_io.select_indices(5, None)) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# CLI end to end with the TorchScript detector


def test_cli_ref_then_calc(setup, tmp_path):
    ref = str(tmp_path / "a.npz")
    common = ["--detector", setup.det, "--workers", "0", "--batch", "16"]
    r = run_cli(["ref", "--data", setup.folder_a, "--dest", ref] + common)
    assert r.exit_code == 0, r.output
    assert set(np.load(ref).files) == {"mu", "sigma"}

    r = run_cli(["calc", "--images", setup.folder_a, "--ref", ref] + common)
    assert r.exit_code == 0, r.output
    assert "FID: 0\n" in r.output  # the same images in the same batches: identical statistics, exactly 0

    # A zip read by a DataLoader worker process (the zip is reopened in the worker).
    r = run_cli(["calc", "--images", setup.zip_a, "--ref", ref, "--batch", "7", "--workers", "1"] + common[:2])
    assert r.exit_code == 0, r.output
    assert abs(parse_fid(r.output)) < 1e-6

    results = tmp_path / "results.tsv"
    for label, extra in (("other", []), ("subset", ["--num", "20", "--seed", "1"])):
        r = run_cli(["calc", "--images", setup.folder_b, "--ref", ref, "--results", str(results), "--label", label]
                    + extra + common)
        assert r.exit_code == 0, r.output
    lines = results.read_text().splitlines()
    assert len(lines) == 2
    cols = [l.split("\t") for l in lines]
    assert [c[0] for c in cols] == ["other", "subset"] and [c[2] for c in cols] == ["40", "20"]
    assert all(c[3] == setup.folder_b for c in cols)
    assert float(cols[0][1]) > 0.01 and float(cols[1][1]) > 0.01 and cols[0][1] != cols[1][1]

    # The number equals the library route computed here from the same images' features.
    det = detectors.load_detector(setup.det)
    feats_a = detectors.compute_features(det, torch.from_numpy(setup.a).permute(0, 3, 1, 2)).numpy()
    feats_b = detectors.compute_features(det, torch.from_numpy(setup.b).permute(0, 3, 1, 2)).numpy()
    expected = frechet.frechet_distance(feats_b.mean(0), np.cov(feats_b, rowvar=False),
                                        feats_a.mean(0), np.cov(feats_a, rowvar=False))
    assert float(cols[0][1]) == pytest.approx(expected, rel=1e-5)


def test_cli_bad_input_gives_one_line_usage_errors(setup, tmp_path):
    ref = str(tmp_path / "r.npz")
    frechet.save_ref(ref, np.zeros(9), np.eye(9))
    base = ["--detector", setup.det, "--workers", "0"]
    cases = [
        (["calc", "--images", str(tmp_path / "nope"), "--ref", ref], "--images"),
        (["calc", "--images", setup.folder_a, "--ref", ref, "--num", "41"], "--num"),
        (["calc", "--images", setup.folder_a, "--ref", str(tmp_path / "nope.npz")], "--ref"),
        (["calc", "--images", setup.folder_a, "--ref", ref, "--num", "1"], "--num"),
        (["ref", "--data", setup.folder_a, "--dest", ref, "--detector", str(tmp_path / "no.pt")], "--detector"),
    ]
    for args, option in cases:
        r = run_cli(args + (base if "--detector" not in args else ["--workers", "0"]))
        assert r.exit_code == 2, (args, r.output)
        assert option in r.output
    mixed = write_pngs(tmp_path / "mixed", list(random_images(3, 0)) + list(random_images(1, 0, size=6)))
    for workers in ("0", "1"):  # raised in the main process, or inside a DataLoader worker
        r = run_cli(["ref", "--data", mixed, "--dest", ref, "--detector", setup.det, "--workers", workers])
        assert r.exit_code == 2 and "mixed image sizes" in r.output, r.output
        assert "Traceback" not in r.output and "worker" not in r.output
    wrong_dim = str(tmp_path / "wrong.npz")
    frechet.save_ref(wrong_dim, np.zeros(5), np.eye(5))
    r = run_cli(["calc", "--images", setup.folder_a, "--ref", wrong_dim] + base)
    assert r.exit_code == 2 and "same feature detector" in r.output


def test_cli_help_shows_defaults():
    r = run_cli(["calc", "--help"])
    assert r.exit_code == 0
    for text in ("--images", "--ref", "--num", "default: 64", "--results", "--label", "in_channels", "default: 0"):
        assert text in r.output, text


def test_streaming_fid_equals_png_route(setup, tmp_path):
    ref = str(tmp_path / "a.npz")
    assert run_cli(["ref", "--data", setup.folder_a, "--dest", ref, "--detector", setup.det, "--workers", "0"]).exit_code == 0
    mu, sigma = frechet.load_ref(ref)
    det = detectors.load_detector(setup.det)
    x = torch.from_numpy(setup.b).permute(0, 3, 1, 2)
    stats = fid.image_stats(image_io.ImageFiles(setup.folder_b), det, batch=16, device="cpu")
    via_png = frechet.frechet_distance(*stats.mean_cov(), mu, sigma)
    # Same batches as the PNG route (40 images in 3 batches of <= 16): bit-identical statistics.
    same = frechet.StreamingFID(det, mu, sigma, device="cpu")
    for idx in image_io.rank_batches(40, 16):
        same.add_images(x[idx])
    assert same.num_images == 40
    assert same.compute() == via_png
    # Other batch sizes change only float32 rounding inside the detector and the summation order.
    other = frechet.StreamingFID(det, mu, sigma, device="cpu")
    for chunk in x.split(5):
        other.add_images(chunk)
    assert other.compute() == pytest.approx(via_png, rel=1e-6)
    assert via_png > 0.01


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup, tmp_path):
    ref = str(tmp_path / "a.npz")
    common = ["--detector", setup.det, "--workers", "0", "--batch", "8"]
    assert run_cli(["ref", "--data", setup.folder_a, "--dest", ref] + common).exit_code == 0
    single = run_cli(["calc", "--images", setup.folder_b, "--ref", ref] + common)
    assert single.exit_code == 0, single.output
    p = torchrun("fid.py", "calc", "--images", setup.folder_b, "--ref", ref, *common, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("FID: ") == 1  # printed by rank 0 only
    assert parse_fid(p.stdout) == pytest.approx(parse_fid(single.output), rel=1e-5)


def test_offline_ref_download_exits_2_with_one_line(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_OFFLINE", "1")
    r = run_cli(["calc", "--images", setup.folder_a, "--ref", "https://example.org/stats/ref.npz", "--detector",
                 setup.det, "--workers", "0", "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: cannot get 'ref.npz'"), r.output


# ----------------------------------------------------------------------------------------------
# Bad options are refused before any work: one line, exit code 2, nothing written


@pytest.fixture
def bad_inputs(tmp_path, monkeypatch):
    """Inputs for the refusal tables, built in tmp_path (also the working folder, so ./src lies there too)."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "in"
    imgs = write_pngs(d / "imgs", random_images(4, seed=0))
    zip_path = str(d / "imgs.zip")
    with zipfile.ZipFile(zip_path, "w") as z:
        for name in sorted(os.listdir(imgs)):
            z.write(os.path.join(imgs, name), arcname=name)
    good = d / "ref.npz"
    np.savez(good, mu=np.zeros(9), sigma=np.eye(9))  # TinyDetector gives 6 + 3 features
    (d / "empty.npz").write_bytes(b"")
    (d / "truncated.npz").write_bytes(good.read_bytes()[:100])
    np.savez(d / "nokeys.npz", mean=np.zeros(9))
    np.savez(d / "shapes.npz", mu=np.zeros(9), sigma=np.eye(8))
    (d / "notes.txt").write_text("not an image, not a network\n")
    (d / "blocker").write_text("a file where a folder is needed\n")
    (d / "folder").mkdir()
    det = str(d / "tiny.pt")
    save_detector(det)
    paths = dict(imgs=imgs, zip=zip_path, ref=str(good), det=det, missing=str(d / "missing"), dir=str(d / "folder"),
                 blocker=str(d / "blocker"), txt=str(d / "notes.txt"), out=str(tmp_path / "out"),
                 **{k: str(d / f"{k}.npz") for k in ("empty", "truncated", "nokeys", "shapes")})
    return tmp_path, paths


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a detector loads, a download starts, an image is decoded or features are computed."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(fid, "load_detector_rank0_first", forbidden)
    monkeypatch.setattr(fid, "compute_features", forbidden)
    monkeypatch.setattr(fid, "iterate_features", forbidden)
    monkeypatch.setattr(image_io.ImageFiles, "read", forbidden)
    monkeypatch.setattr(dnnlib.util, "download_file", forbidden)
    monkeypatch.setattr(fid.dist, "init", forbidden)
    return forbidden


def refused(command, base, args, paths, root):
    """Run `command` with base + args (a later option overrides an earlier one), return its result after checking
    that nothing under root changed."""
    before = tree(root)
    result = CliRunner().invoke(command, [a.format(**paths) for a in base + list(args)])
    assert tree(root) == before, result.output
    return result


URL_DETECTOR = "https://example.org/nets/detector.pt"
URL_REF = "https://example.org/stats/ref.npz"
CALC = ["calc", "--images", "{imgs}", "--ref", "{ref}", "--detector", "{det}", "--workers", "0", "--device", "cpu"]
REF = ["ref", "--data", "{imgs}", "--dest", "{out}/ref.npz", "--detector", "{det}", "--workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("args, words", [
    # bad paths
    (["--images", "{missing}"], ["--images", "no such folder"]),
    (["--images", "{txt}"], ["--images", "neither a folder nor a zip"]),
    (["--images", "{dir}"], ["--images", "no PNG/JPG images"]),
    (["--ref", "{missing}"], ["--ref", "no such file"]),
    (["--ref", "{dir}"], ["--ref", "is a folder"]),
    (["--ref", "{empty}"], ["--ref", "not a readable .npz file"]),
    (["--ref", "{truncated}"], ["--ref", "not a readable .npz file"]),
    (["--ref", "{nokeys}"], ["--ref", "'mu' and 'sigma'"]),
    (["--ref", "{shapes}"], ["--ref", "are not the shapes [D] and [D, D]"]),
    (["--detector", "{missing}"], ["--detector", "no such file"]),
    (["--detector", "{dir}"], ["--detector", "is a folder"]),
    (["--detector", "{txt}"], ["--detector", "unknown format"]),
    (["--results", "{dir}"], ["--results", "is a folder"]),
    (["--results", "{blocker}/fid.tsv"], ["--results", "is a file"]),
    (["--detector", URL_DETECTOR, "--cache", "{blocker}"], ["--cache", "is a file"]),
    (["--ref", URL_REF, "--cache", "{blocker}"], ["--cache", "is a file"]),
    # bad devices
    (["--device", "tpu"], ["--device", "not a device"]),
    (["--device", "cuda:99"], ["--device", "cuda:99"]),
    # bad ranges
    (["--num", "0"], ["--num", "not in the range"]),
    (["--num", "-3"], ["--num", "not in the range"]),
    (["--num", "5"], ["--num", "holds only 4 images"]),
    (["--batch", "0"], ["--batch", "not in the range"]),
    (["--workers", "-1"], ["--workers", "not in the range"]),
    # contradictory options
    (["--label", "run1"], ["--label", "add --results"]),
    (["--results", "{ref}"], ["--results", "also the --ref file"]),
    (["--images", "{zip}", "--results", "{zip}"], ["--results", "also the --images zip"]),
])
def test_calc_refuses_bad_options_before_any_work(bad_inputs, no_work, args, words):
    root, paths = bad_inputs
    assert_one_line_refusal(refused(fid.main, CALC, args, paths, root), *words)


@pytest.mark.parametrize("args, words", [
    (["--dest", "{dir}"], ["--dest", "is a folder"]),
    (["--dest", "{blocker}/ref.npz"], ["--dest", "is a file"]),
    (["--data", "{missing}"], ["--data", "no such folder"]),
    (["--data", "{txt}"], ["--data", "neither a folder nor a zip"]),
    (["--detector", "{missing}"], ["--detector", "no such file"]),
    (["--detector", "{txt}"], ["--detector", "unknown format"]),
    (["--detector", URL_DETECTOR, "--cache", "{blocker}"], ["--cache", "is a file"]),
    (["--device", "tpu"], ["--device", "not a device"]),
    (["--device", "cuda:99"], ["--device", "cuda:99"]),
    (["--batch", "0"], ["--batch", "not in the range"]),
    (["--workers", "-2"], ["--workers", "not in the range"]),
    (["--data", "{zip}", "--dest", "{zip}"], ["--dest", "also the --data zip"]),
])
def test_ref_refuses_bad_options_before_any_work(bad_inputs, no_work, args, words):
    root, paths = bad_inputs
    assert_one_line_refusal(refused(fid.main, REF, args, paths, root), *words)


def test_ref_of_another_detector_is_refused_before_the_features(bad_inputs, monkeypatch):
    root, paths = bad_inputs
    np.savez(os.path.join(paths["dir"], "ref5.npz"), mu=np.zeros(5), sigma=np.eye(5))
    batches = []
    real = fid.iterate_features
    monkeypatch.setattr(fid, "iterate_features", lambda *a, **k: batches.append(1) or real(*a, **k))
    r = refused(fid.main, CALC, ["--ref", "{dir}/ref5.npz"], paths, root)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: Invalid value for --ref:") and "5 features but the detector gives 9" in last
    assert not batches  # found from one image, before the features of all images


def test_device_and_workers_reach_the_computation(bad_inputs, monkeypatch):
    root, paths = bad_inputs
    seen = {}
    real_init, real_iterate = fid.dist.init, fid.iterate_features

    def init(device=None):
        seen["init"] = device
        return real_init(device)

    def iterate(*args, **kwargs):
        seen["workers"], seen["device"] = kwargs["num_workers"], kwargs["device"]
        return real_iterate(*args, **dict(kwargs, num_workers=0))

    monkeypatch.setattr(fid.dist, "init", init)
    monkeypatch.setattr(fid, "iterate_features", iterate)
    monkeypatch.setattr(fid, "default_workers", lambda: 0)
    base = [a.format(**paths) for a in CALC if a not in ("--workers", "0", "--device", "cpu")]
    results = os.path.join(paths["out"], "new", "fid.tsv")  # its folder is made when the line is written
    r = CliRunner().invoke(fid.main, base + ["--results", results])
    assert r.exit_code == 0, r.output
    assert open(results).read().startswith(paths["imgs"] + "\t")
    assert seen == dict(init=torch.device("cpu"), workers=0, device=torch.device("cpu"))  # no CUDA here: cpu
    r = CliRunner().invoke(fid.main, base + ["--workers", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert seen["workers"] == 2  # an explicit --workers is kept as given


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (3, 2), (4, 3), (64, 3)])
def test_default_workers_leave_a_core_free(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert fid.default_workers() == workers


def test_device_index_outside_torchrun_is_kept_as_given(monkeypatch):
    """dist.init: a plain process keeps --device=cuda:1 as given; under torchrun each rank takes cuda:LOCAL_RANK."""
    from torch_utils import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init("cuda:1") == torch.device("cuda", 1) and chosen == [1]
    assert distributed.init("cuda") == torch.device("cuda", 0)
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no process group is made here
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init("cuda:1") == torch.device("cuda", 0)


def test_psnr_is_the_mean_over_images_of_10_log10_of_255_squared_over_the_mse():
    """metrics.images.psnr_uint8 (the built-in benchmark's PSNR and benchmarks/check_equivalence.py's), against values
    worked out by hand: a uniform error of e gives 20·log10(255/e) dB; the mean is taken over images, in dB."""
    reference = torch.full([2, 3, 4, 4], 100, dtype=torch.uint8)
    images = reference.clone()
    images[0] += 1                           # MSE 1: 20·log10(255) = 48.1308 dB
    images[1, :, :2] += 10                   # half the pixels off by 10: MSE 50, 10·log10(255²/50) = 31.1411 dB
    by_hand = (20 * np.log10(255.0) + 10 * np.log10(255.0 ** 2 / 50)) / 2
    assert image_io.psnr_uint8(images, reference) == pytest.approx(by_hand, abs=1e-9)
    assert by_hand == pytest.approx((48.1308 + 31.1411) / 2, abs=1e-4)
    # identical images: the MSE floor of 1e-10 instead of an infinite PSNR
    assert image_io.psnr_uint8(reference, reference) == pytest.approx(10 * np.log10(255.0 ** 2 / 1e-10), abs=1e-9)
    # uint8 arithmetic would wrap: 0 against 255 is an error of 255 (0 dB), not of 1.
    assert image_io.psnr_uint8(torch.zeros([1, 1, 2, 2], dtype=torch.uint8),
                               torch.full([1, 1, 2, 2], 255, dtype=torch.uint8)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="equal shapes"):
        image_io.psnr_uint8(images[:1], reference)


# ---------------------------------------------------------------------------------------------------------------------
# Every option reaches the code it names, and the defaults --help documents are the ones that run.


@pytest.fixture(scope="module")
def wiring(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid-wiring")
    paths = dict(imgs=write_pngs(d / "imgs", random_images(6, seed=5)),
                 data=write_pngs(d / "data", random_images(7, seed=6)), det=save_detector(d / "tiny.pt"))
    paths["ref"] = str(d / "ref.npz")
    r = CliRunner().invoke(fid.main, ["ref", "--data", paths["data"], "--dest", paths["ref"], "--detector",
                                      paths["det"], "--workers", "0"])
    assert r.exit_code == 0, r.output
    return paths


def observed_fid(monkeypatch, command, args):
    rec = CallRecorder(monkeypatch)
    for name in ("open_images", "get_detector", "compute_stats_or_fail", "read_ref", "frechet_distance", "save_ref"):
        rec.wrap(fid, name)
    r = CliRunner().invoke(fid.main, [command] + args)
    assert r.exit_code == 0, r.output
    calls = rec.calls
    (stats,) = calls["compute_stats_or_fail"]
    seen = {"--detector": calls["get_detector"][0]["spec"], "--cache": calls["get_detector"][0]["cache"],
            "--device": str(calls["get_detector"][0]["device"]), "--batch": stats["batch"],
            "--workers": stats["workers"], "images": stats["images"], "output": r.output}
    if command == "calc":
        (opened,) = calls["open_images"]
        (ref,) = calls["read_ref"]
        (distance,) = calls["frechet_distance"]
        seen.update({"--images": opened["path"], "--num": opened["num"], "--seed": opened["seed"],
                     "--ref": ref["ref_path"], "ref cache": ref["cache"], "distance": distance})
    else:
        (opened,) = calls["open_images"]
        (saved,) = calls["save_ref"]
        seen.update({"--data": opened["path"], "saved": saved})
    return seen


@pytest.mark.parametrize("extra, expected", [
    ([], {"--num": None, "--seed": 0, "--batch": 64, "--cache": "./src", "ref cache": "./src", "--device": "cpu",
          "--workers": fid.default_workers()}),
    (["--num", "4", "--seed", "3"], {"--num": 4, "--seed": 3}),
    (["--batch", "2", "--workers", "1", "--device", "cpu", "--cache", "elsewhere"],
     {"--batch": 2, "--workers": 1, "--device": "cpu", "--cache": "elsewhere", "ref cache": "elsewhere"}),
])
def test_calc_options_reach_the_computation(wiring, monkeypatch, extra, expected):
    args = ["--images", wiring["imgs"], "--ref", wiring["ref"], "--detector", wiring["det"]] + extra
    seen = observed_fid(monkeypatch, "calc", args)
    assert (seen["--images"], seen["--ref"], seen["--detector"]) == (wiring["imgs"], wiring["ref"], wiring["det"])
    assert {k: seen[k] for k in expected} == expected
    # The images' statistics on one side, the --ref file's on the other.
    images = seen["images"]
    assert images.path == wiring["imgs"] and len(images) == (extra[1] and int(extra[1]) if "--num" in extra else 6)
    ref = np.load(wiring["ref"])
    d = seen["distance"]
    assert np.array_equal(d["mu2"], ref["mu"]) and np.array_equal(d["sigma2"], ref["sigma"])
    assert d["mu1"].shape == ref["mu"].shape and not np.array_equal(d["mu1"], ref["mu"])


def test_results_line_carries_label_fid_count_and_images(wiring, monkeypatch, tmp_path):
    results = str(tmp_path / "fid.tsv")
    base = ["--images", wiring["imgs"], "--ref", wiring["ref"], "--detector", wiring["det"], "--results", results]
    seen = observed_fid(monkeypatch, "calc", base + ["--num", "5"])
    observed_fid(monkeypatch, "calc", base + ["--label", "run1"])
    value = float(re.search(r"FID: (\S+)", seen["output"]).group(1))
    lines = [line.split("\t") for line in open(results).read().splitlines()]
    assert lines[0] == [wiring["imgs"], f"{value:.6g}", "5", wiring["imgs"]]  # --label defaults to the --images path
    assert lines[1][0] == "run1" and lines[1][2:] == ["6", wiring["imgs"]]


def test_ref_options_reach_the_computation(wiring, monkeypatch, tmp_path):
    dest = str(tmp_path / "out.npz")
    seen = observed_fid(monkeypatch, "ref", ["--data", wiring["data"], "--dest", dest, "--detector", wiring["det"],
                                             "--batch", "3", "--workers", "1", "--cache", "elsewhere"])
    assert {k: seen[k] for k in ("--data", "--batch", "--workers", "--cache")} == {
        "--data": wiring["data"], "--batch": 3, "--workers": 1, "--cache": "elsewhere"}
    assert seen["saved"]["path"] == dest and len(seen["images"]) == 7
    saved = np.load(dest)
    assert np.array_equal(saved["mu"], seen["saved"]["mu"]) and np.array_equal(saved["sigma"], seen["saved"]["sigma"])


@pytest.mark.parametrize("command", ["calc", "ref"])
def test_documented_defaults_are_the_ones_that_run(wiring, monkeypatch, tmp_path, command):
    documented = documented_defaults(fid.main, command)
    assert "inception-2015-12-05.pkl" in documented.pop("--detector")  # offline here: see the download tests
    assert documented.pop("--device") == "cuda if this machine has it, else cpu"
    args = (["--images", wiring["imgs"], "--ref", wiring["ref"]] if command == "calc" else
            ["--data", wiring["data"], "--dest", str(tmp_path / "out.npz")])
    seen = observed_fid(monkeypatch, command, args + ["--detector", wiring["det"]])
    assert seen["--device"] == "cpu"
    assert documented.pop("--workers").endswith(f"here {seen['--workers']}")
    if command == "calc":
        assert documented.pop("--num") == "all images" and seen["--num"] is None and len(seen["images"]) == 6
        assert documented.pop("--results") == "none" and "--results" not in seen
        assert documented.pop("--label") == "the --images path"  # test_results_line_carries_label_...
    assert {k: str(seen[k]) for k in documented} == documented

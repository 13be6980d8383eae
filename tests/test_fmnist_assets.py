"""The shipped Fashion-MNIST teacher, detector and reference statistics load and do their jobs."""

import os
import re

import numpy as np
import pytest
import torch

import dataset_tool
from metrics.detectors import compute_features, detector_in_channels, load_detector
from metrics.frechet import FeatureStats, frechet_distance, load_ref
from models import load_network
from models.registry import BACKBONES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
TEACHER = os.path.join(ASSETS, "fmnist-teacher.pkl")
DETECTOR = os.path.join(ASSETS, "fmnist-detector.pt")
REF = os.path.join(ASSETS, "fmnist-train-ref.npz")

# The architecture experiments/train_teacher.py builds by default (what the registry row must say).
TEACHER_KWARGS = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2, 4], num_blocks=2,
                      attn_resolutions=[8], dropout=0.0, augment_dim=0)

needs_fmnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(dataset_tool.FMNIST_DEBIAN_DIR, dataset_tool.FMNIST_FILES["test"][0])),
    reason="Fashion-MNIST idx files (Debian package dataset-fashion-mnist) not installed")


@pytest.fixture(scope="module")
def test_images():
    """The first 512 Fashion-MNIST test images, padded to 32x32 as dataset_tool.py writes them, and labels."""
    images, labels = dataset_tool.load_fmnist(dataset_tool.FMNIST_DEBIAN_DIR, "test")
    images = np.pad(images[:512], [(0, 0), (2, 2), (2, 2)])
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels[:512].astype(np.int64))


@pytest.fixture(scope="module")
def detector():
    return load_detector(DETECTOR)


def test_sizes():
    assert os.path.getsize(TEACHER) <= 10 * 2**20
    assert os.path.getsize(DETECTOR) <= 2 * 2**20


def test_detector_interface(detector):
    assert detector_in_channels(detector) == 1
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, [4, 1, 28, 28], dtype=torch.uint8, generator=g)
    features = compute_features(detector, images)
    assert features.shape == (4, 128) and torch.isfinite(features).all()
    # 28x28 input is padded by 2 black pixels: the same features as the padded 32x32 image.
    padded = torch.nn.functional.pad(images, [2, 2, 2, 2])
    torch.testing.assert_close(compute_features(detector, padded), features, rtol=1e-5, atol=1e-5)
    assert detector(padded).shape == (4, 10)  # logits without return_features


# Every op the shipped detector's TorchScript may name: all exist in torch 2.0 and later. A scripted
# F.interpolate names every resize mode's op, among them aten::_upsample_lanczos2d_aa, which torch 2.11 lacks:
# such a file failed to load on the GPU machine's torch 2.11.
DETECTOR_OPS = {"__getitem__", "__not__", "_upsample_bilinear2d_aa", "add", "add_", "batch_norm", "conv2d", "dim",
                "div", "dropout", "eq", "flatten", "format", "len", "linear", "max_pool2d", "mean", "mul", "ne",
                "pad", "relu", "size", "sub", "to"}


def test_detector_names_only_ops_older_torch_has(detector):
    named = set(re.findall(r"aten::(\w+)", str(detector.inlined_graph)))
    assert named <= DETECTOR_OPS, sorted(named - DETECTOR_OPS)


def test_train_detector_exports_only_those_ops():
    from experiments import train_detector

    scripted = torch.jit.script(train_detector.PooledTrunk(train_detector.FMNISTClassifier()).eval())
    named = set(re.findall(r"aten::(\w+)", str(scripted.inlined_graph)))
    assert named <= DETECTOR_OPS, sorted(named - DETECTOR_OPS)
    images = torch.randint(0, 256, [2, 1, 40, 40], dtype=torch.uint8)  # resized: antialiased bilinear
    expected = torch.nn.functional.interpolate(images.float() / 127.5 - 1, size=[32, 32], mode="bilinear",
                                               align_corners=False, antialias=True)
    torch.testing.assert_close(train_detector.network_input(images, 32), expected)


def test_reference_statistics():
    mu, sigma = load_ref(REF)
    assert mu.shape == (128,) and sigma.shape == (128, 128)
    assert np.isfinite(mu).all() and np.isfinite(sigma).all()
    np.testing.assert_allclose(sigma, sigma.T, atol=1e-10)
    assert np.linalg.eigvalsh(sigma).min() > -1e-8  # a covariance


@needs_fmnist
def test_detector_classifies_and_ref_matches_real_images(detector, test_images):
    images, labels = test_images
    with torch.no_grad():
        accuracy = (detector(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.85
    # Test images are close to the training statistics; uniform noise is far from them.
    mu_ref, sigma_ref = load_ref(REF)
    real = FeatureStats()
    real.add(compute_features(detector, images))
    noise = FeatureStats()
    noise.add(compute_features(detector, torch.randint(0, 256, images.shape, dtype=torch.uint8,
                                                       generator=torch.Generator().manual_seed(1))))
    fid_real = frechet_distance(*real.mean_cov(), mu_ref, sigma_ref)
    fid_noise = frechet_distance(*noise.mean_cov(), mu_ref, sigma_ref)
    assert fid_real * 20 < fid_noise, (fid_real, fid_noise)


@pytest.mark.slow
def test_teacher_loads_from_pickle():
    loaded = load_network(model_path=TEACHER)
    net = loaded.net
    assert (net.img_resolution, net.img_channels, net.label_dim) == (32, 1, 0)
    for key, value in TEACHER_KWARGS.items():
        assert net.init_kwargs[key] == value, key
    assert all(p.dtype == torch.float32 for p in net.parameters())
    x = torch.randn([2, 1, 32, 32], generator=torch.Generator().manual_seed(0)) * 80
    with torch.no_grad():
        out = net(x, torch.tensor([80.0, 80.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@needs_fmnist
def test_teacher_denoises_real_images(test_images):
    """The teacher learned the data: its estimate is far closer to the clean image than its noisy input.

    Measured (MSE out / MSE in on these 32 images): 0.178 at sigma 0.1 and 0.060 at sigma 0.5 for the shipped
    1161-kimg teacher, 0.23 and 0.081 after 47 kimg of training; a network after 9 kimg gives 0.78 and 0.25, a
    random one 1.0.
    """
    net = load_network(model_path=TEACHER).net
    images = test_images[0][:32].to(torch.float32) / 127.5 - 1
    for sigma, bound in ((0.1, 0.5), (0.5, 0.15)):
        noisy = images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            denoised = net(noisy, sigma)
        ratio = ((denoised - images).square().mean() / (noisy - images).square().mean()).item()
        assert ratio < bound, (sigma, ratio)


def test_registry_row_builds_the_shipped_teacher():
    """A table row with the teacher's keywords loads the pickle strictly (the row design §6 needs for fmnist)."""
    row = BACKBONES["fmnist"]
    assert row.path == "assets/fmnist-teacher.pkl" and (row.resolution, row.channels, row.label_dim) == (32, 1, 0)
    assert {k: row.network_kwargs[k] for k in TEACHER_KWARGS} == TEACHER_KWARGS
    from_row = load_network("fmnist").net
    from_file = load_network(model_path=TEACHER).net
    for (name, a), (_, b) in zip(from_row.state_dict().items(), from_file.state_dict().items()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------
# The commands that made the assets (tiny runs).


def test_edm_loss_weighting():
    from training.edm_loss import EDMLoss

    loss_fn = EDMLoss()
    sigma = loss_fn.sample_sigma(200_000, "cpu", torch.Generator().manual_seed(0)).log()
    assert abs(sigma.mean().item() + 1.2) < 0.01 and abs(sigma.std().item() - 1.2) < 0.01
    s = torch.tensor([0.1, 0.5, 2.0])
    torch.testing.assert_close(loss_fn.weight(s), (s ** 2 + 0.25) / (s * 0.5) ** 2)

    class Identity(torch.nn.Module):  # D(x) = x: the loss is weight * sigma^2 * n^2
        def forward(self, x, sigma, class_labels=None, augment_labels=None):
            return x

    images = torch.zeros([4096, 1, 2, 2])
    loss = loss_fn(Identity(), images, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    sigma = loss_fn.sample_sigma(4096, "cpu", g)
    noise = torch.randn(images.shape, generator=g) * sigma
    torch.testing.assert_close(loss, loss_fn.weight(sigma) * noise ** 2)


def test_train_teacher_resumes_exactly(tmp_path):
    """Killed half-way and resumed, a run ends with the same EMA weights as a straight run."""
    from click.testing import CliRunner

    from experiments import train_teacher
    from tests.test_dataset_tool import make_source, run_tool

    make_source(tmp_path / "idx", num_train=40)
    data = str(tmp_path / "fm.zip")
    assert run_tool(f"--source={tmp_path / 'idx'}", f"--dest={data}").exit_code == 0
    common = ["--data", data, "--cbase", "8", "--cmult", "1,2", "--num_blocks", "1", "--attn_res", "16",
              "--batch", "8", "--lr_rampup_kimg", "0.016", "--ema_halflife_kimg", "0.02", "--threads", "1",
              "--device", "cpu", "--xflip"]

    def train(outdir, total_kimg, *extra):
        result = CliRunner().invoke(train_teacher.main, [*common, "--outdir", str(outdir), "--total_kimg",
                                                         str(total_kimg), *extra])
        assert result.exit_code == 0, result.output
        return result.output

    out = train(tmp_path / "straight", 0.048)
    assert "kimg      0.0  loss" in out and os.path.isfile(tmp_path / "straight" / "network-snapshot-000000.pkl")
    train(tmp_path / "resumed", 0.024)
    assert "Resumed from" in train(tmp_path / "resumed", 0.048, "--resume")
    a = load_network(model_path=str(tmp_path / "straight" / "network-snapshot-000000.pkl")).net.state_dict()
    b = load_network(model_path=str(tmp_path / "resumed" / "network-snapshot-000000.pkl")).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = load_network(model_path=str(tmp_path / "straight" / "network-snapshot-000000.pkl")).net
    assert first.init_kwargs["model_channels"] == 8 and first.img_resolution == 32

    result = CliRunner().invoke(train_teacher.main, [*common, "--outdir", str(tmp_path / "straight")])
    assert result.exit_code == 2 and "already holds a run; add --resume" in result.output
    changed = [c if c != "8" else "12" for c in common]
    result = CliRunner().invoke(train_teacher.main, [*changed, "--outdir", str(tmp_path / "straight"), "--resume"])
    assert result.exit_code == 2 and "--cbase was 8 in the run being resumed, now 12" in result.output


def test_train_teacher_continues_from_a_pickle(tmp_path):
    """--init starts from a pickle's weights with the count at --init_kimg and a fresh warm-up; it resumes exactly."""
    from click.testing import CliRunner

    from experiments import train_teacher
    from tests.test_dataset_tool import make_source, run_tool

    make_source(tmp_path / "idx", num_train=40)
    data = str(tmp_path / "fm.zip")
    assert run_tool(f"--source={tmp_path / 'idx'}", f"--dest={data}").exit_code == 0
    common = ["--data", data, "--cbase", "8", "--cmult", "1,2", "--num_blocks", "1", "--attn_res", "16",
              "--batch", "8", "--ema_halflife_kimg", "0.02", "--threads", "1", "--device", "cpu"]

    def train(outdir, total_kimg, *extra):
        return CliRunner().invoke(train_teacher.main, [*common, "--outdir", str(outdir), "--total_kimg",
                                                       str(total_kimg), *extra])

    assert train(tmp_path / "first", 0.016).exit_code == 0
    init = str(tmp_path / "first" / "network-snapshot-000000.pkl")
    weights = load_network(model_path=init).net.state_dict()

    # One step at the start of the warm-up has lr 0: the snapshot is the pickle's network, named by the count.
    result = train(tmp_path / "one", 2.008, "--init", init, "--init_kimg", "2")
    assert result.exit_code == 0, result.output
    assert "Initialised from" in result.output and "kimg      2.0  loss" in result.output
    after = load_network(model_path=str(tmp_path / "one" / "network-snapshot-000002.pkl")).net.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)

    # Killed inside the warm-up and resumed, the continued run ends where a straight one does.
    warm = ["--init", init, "--init_kimg", "2", "--lr_rampup_kimg", "0.048"]
    assert train(tmp_path / "straight", 2.048, *warm).exit_code == 0
    assert train(tmp_path / "resumed", 2.024, *warm).exit_code == 0
    result = train(tmp_path / "resumed", 2.048, "--resume", "--lr_rampup_kimg", "0.048")
    assert result.exit_code == 0 and "Resumed from" in result.output, result.output
    a = load_network(model_path=str(tmp_path / "straight" / "network-snapshot-000002.pkl")).net.state_dict()
    b = load_network(model_path=str(tmp_path / "resumed" / "network-snapshot-000002.pkl")).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], weights[k]) for k in a)

    result = train(tmp_path / "wider", 2.008, "--init", init, "--cbase", "12")
    assert result.exit_code == 2 and "--init" in result.output and "does not match" in result.output
    assert not os.path.exists(tmp_path / "wider" / "training_options.json")
    result = train(tmp_path / "nofile", 1, "--init", str(tmp_path / "missing.pkl"))
    assert result.exit_code == 2 and "is not a file" in result.output and not os.path.exists(tmp_path / "nofile")
    result = train(tmp_path / "alone", 1, "--init_kimg", "5")
    assert result.exit_code == 2 and "only meaningful with --init" in result.output

"""The FID Inception-v3 architecture (metrics/inception_arch.py): shapes, parameter count, resize rule."""

import numpy as np
import pytest
import torch
from torch import nn

from metrics.detectors import compute_features
from metrics.inception_arch import ConvBN, InceptionV3, ShiftBatchNorm, resize_like_nvidia

# Parameters of NVIDIA's inception-2015-12-05 port without its 2048->1008 classifier: convolutions without
# bias, batch norms with a shift but no scale. Cross-check against torchvision's Inception-v3 (27,161,264
# parameters with aux classifier and 1000-way fc): 27,161,264 - 3,326,696 (aux) - 2,049,000 (fc)
# = 21,785,568 = this count + 17,216 batch-norm scales.
TRUNK_PARAMS = 21_768_352
BN_CHANNELS = 17_216
CLASSIFIER_PARAMS = 2048 * 1008 + 1008


@pytest.fixture(scope="module")
def det():
    torch.manual_seed(0)
    return InceptionV3()


@pytest.fixture(scope="module")
def run(det):
    """One forward at 299 of three images, recording the output shape of every top-level layer."""
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
             for name, m in det.layers.named_children()]
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, [3, 3, 32, 32], dtype=torch.uint8, generator=gen)
    try:
        features = det(images, return_features=True)
    finally:
        for h in hooks:
            h.remove()
    return images, features, shapes


def test_features_shape_and_values(run):
    images, features, _ = run
    assert features.shape == (3, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert (features >= 0).all()  # an average of ReLU outputs
    assert features.std() > 0.05  # random weights still give an informative, non-degenerate signal
    assert (features[0] - features[1]).abs().max() > 1e-3  # different images, different features


def test_block_shapes_follow_the_fid_graph(run):
    _, _, shapes = run
    assert shapes["conv"] == (3, 32, 149, 149)
    assert shapes["pool0"] == (3, 64, 73, 73)
    assert shapes["pool1"] == (3, 192, 35, 35)
    assert shapes["mixed"] == (3, 256, 35, 35)
    assert shapes["mixed_2"] == (3, 288, 35, 35)
    assert shapes["mixed_3"] == (3, 768, 17, 17)
    assert shapes["mixed_7"] == (3, 768, 17, 17)
    assert shapes["mixed_8"] == (3, 1280, 8, 8)
    assert shapes["mixed_10"] == (3, 2048, 8, 8)


def test_parameter_count_matches_the_real_detector(det):
    total = sum(p.numel() for p in det.parameters())
    classifier = sum(p.numel() for p in det.output.parameters())
    assert classifier == CLASSIFIER_PARAMS
    assert total - classifier == TRUNK_PARAMS
    bn = sum(m.bias.numel() for m in det.modules() if isinstance(m, ShiftBatchNorm))
    assert bn == BN_CHANNELS
    assert TRUNK_PARAMS + BN_CHANNELS == 27_161_264 - 3_326_696 - 2_049_000


def test_fid_specific_layers(det):
    units = [m for m in det.modules() if isinstance(m, ConvBN)]
    assert len(units) == 94
    assert all(u.conv.bias is None and u.bn.eps == 1e-3 and not hasattr(u.bn, "weight") for u in units)
    avg = [m for m in det.modules() if isinstance(m, nn.AvgPool2d)]
    assert len(avg) == 3 + 4 + 1 and all(not p.count_include_pad for p in avg)
    assert isinstance(det.layers.mixed_9.tower_2_pool, nn.AvgPool2d)
    assert isinstance(det.layers.mixed_10.tower_2_pool, nn.MaxPool2d)  # the FID graph's last block pools by max
    names = dict(det.named_parameters())
    assert "layers.mixed_3.tower.conv_2.conv.weight" in names
    assert "layers.mixed_10.tower_1_mixed_conv_1.bn.bias" in names
    assert names["output.weight"].shape == (1008, 2048)


def _tf1_bilinear(img, size):
    """Reference: TF1 resize_bilinear without corner alignment: target j samples source j*W/size (clamped)."""
    h, w = img.shape
    out = np.zeros([size, size])
    for i in range(size):
        u = i * h / size
        i0 = min(int(np.floor(u)), h - 1)
        i1, fi = min(i0 + 1, h - 1), u - np.floor(u)
        for j in range(size):
            v = j * w / size
            j0 = min(int(np.floor(v)), w - 1)
            j1, fj = min(j0 + 1, w - 1), v - np.floor(v)
            top = img[i0, j0] * (1 - fj) + img[i0, j1] * fj
            bottom = img[i1, j0] * (1 - fj) + img[i1, j1] * fj
            out[i, j] = top * (1 - fi) + bottom * fi
    return out


def test_resize_is_tf1_bilinear():
    img = torch.arange(35, dtype=torch.float64).reshape(5, 7) ** 1.5
    ours = resize_like_nvidia(img[None, None], size=13)[0, 0].numpy()
    np.testing.assert_allclose(ours, _tf1_bilinear(img.numpy(), 13), rtol=1e-9, atol=1e-9)
    # Not torch's default bilinear interpolation (half-pixel centres): the two rules differ.
    theirs = torch.nn.functional.interpolate(img[None, None], size=13, mode="bilinear", align_corners=False)
    assert not np.allclose(ours, theirs[0, 0].numpy(), atol=1e-3)


def test_resize_keeps_a_299_image():
    x = torch.rand(1, 3, 299, 299, dtype=torch.float64) * 255
    torch.testing.assert_close(resize_like_nvidia(x), x, rtol=0, atol=1e-9)


def test_detector_interface():
    torch.manual_seed(0)
    small = InceptionV3(input_size=75)  # same network, cheaper input: the pool is global
    gray = torch.randint(0, 256, [2, 1, 16, 16], dtype=torch.uint8)
    feats = compute_features(small, gray)  # grayscale is repeated to RGB by metrics.detectors
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    torch.testing.assert_close(feats.float(), small(gray.repeat(1, 3, 1, 1), return_features=True))
    probs = small(gray.repeat(1, 3, 1, 1))
    assert probs.shape == (2, 1008)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="75"):
        InceptionV3(input_size=64)
    with pytest.raises(ValueError, match="3, H, W"):
        small(gray)

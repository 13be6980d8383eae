"""Inception-v3 in the form FID uses: NVIDIA's port of TensorFlow's `inception-2015-12-05` graph.

A plain `torch.nn.Module` with random weights, built to the detector's shapes so that feature extraction
can be timed and tested without the 90 MB download (`benchmarks/bench_fid.py`). It is called like the
real detector (`metrics.detectors`): `det(images_uint8_nchw, return_features=True) -> [N, 2048]`.

What makes it the FID network rather than torchvision's Inception-v3 (facts of the TF graph / NVIDIA port):
  * input: uint8-valued NCHW, resampled to 299x299 inside by `affine_grid` + `grid_sample` (bilinear,
    border padding, align_corners=False, with a 1/W - 1/299 shift of the grid), then (x - 128) / 128;
  * every convolution has no bias; its batch norm (eps 1e-3) has a shift but no scale;
  * the average pools of the mixed blocks do not count padding; the last block pools by max instead;
  * features are the 2048-d global average of the last block ("pool3"); the classifier has 1008 outputs.

Sub-module names follow the port's TorchScript module (`layers.mixed_3.tower_1.conv_2.conv.weight`, ...)
so a later weight loader can map the real file's state dict by name.
"""

import torch
import torch.nn.functional as F
from torch import nn

FID_INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier: 1000 ImageNet classes + 8 unused


class ShiftBatchNorm(nn.Module):
    """Inference batch norm with a learned shift only (the TF graph's batch norms have no scale)."""

    def __init__(self, channels, eps=1e-3):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Module):
    """conv (no bias) -> shift-only batch norm -> ReLU: the unit every tower is built from."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = ShiftBatchNorm(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tower(*units):
    """A chain of units named conv, conv_1, conv_2, ... (a `pool` may lead), as in the port."""
    tower = nn.Sequential()
    k = 0
    for unit in units:
        if isinstance(unit, (nn.AvgPool2d, nn.MaxPool2d)):
            tower.add_module("pool", unit)
        else:
            tower.add_module("conv" if k == 0 else f"conv_{k}", unit)
            k += 1
    return tower


def _avg_pool_3x3():
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (TF mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels, pool_channels):
        super().__init__()
        self.conv = ConvBN(in_channels, 64, 1)
        self.tower = _tower(ConvBN(in_channels, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _tower(ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _tower(_avg_pool_3x3(), ConvBN(in_channels, pool_channels, 1))
        self.out_channels = 64 + 64 + 96 + pool_channels

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class ReduceB(nn.Module):
    """35x35 -> 17x17 (TF mixed_3): stride-2 3x3 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = ConvBN(in_channels, 384, 3, stride=2)
        self.tower = _tower(ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)
        self.out_channels = 384 + 96 + in_channels

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF mixed_4..mixed_7); `mid` = the 7x7 towers' width."""

    def __init__(self, in_channels, mid):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.conv = ConvBN(in_channels, 192, 1)
        self.tower = _tower(ConvBN(in_channels, mid, 1), ConvBN(mid, mid, **row), ConvBN(mid, 192, **col))
        self.tower_1 = _tower(ConvBN(in_channels, mid, 1), ConvBN(mid, mid, **col), ConvBN(mid, mid, **row),
                              ConvBN(mid, mid, **col), ConvBN(mid, 192, **row))
        self.tower_2 = _tower(_avg_pool_3x3(), ConvBN(in_channels, 192, 1))
        self.out_channels = 4 * 192

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class ReduceD(nn.Module):
    """17x17 -> 8x8 (TF mixed_8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels):
        super().__init__()
        self.tower = _tower(ConvBN(in_channels, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _tower(ConvBN(in_channels, 192, 1), ConvBN(192, 192, (1, 7), padding=(0, 3)),
                              ConvBN(192, 192, (7, 1), padding=(3, 0)), ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)
        self.out_channels = 320 + 192 + in_channels

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


class MixedE(nn.Module):
    """8x8 block whose towers end in parallel 1x3 and 3x1 convolutions (TF mixed_9, mixed_10).

    The FID graph pools by average (padding not counted) in mixed_9 and by max in mixed_10.
    """

    def __init__(self, in_channels, pool):
        super().__init__()
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.conv = ConvBN(in_channels, 320, 1)
        self.tower_conv = ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, **row)
        self.tower_mixed_conv_1 = ConvBN(384, 384, **col)
        self.tower_1_conv = ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, **row)
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, **col)
        self.tower_2_pool = _avg_pool_3x3() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(in_channels, 192, 1)
        self.out_channels = 320 + 2 * 384 + 2 * 384 + 192

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([
            self.conv(x),
            self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.tower_2_pool(x)),
        ], dim=1)


def resize_like_nvidia(x, size=FID_INPUT_SIZE):
    """Bilinear resampling of NCHW float images to size x size exactly as NVIDIA's detector does it."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    # The port shifts the sampling grid by half a source pixel minus half a target pixel (normalised units).
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionV3(nn.Module):
    """The FID Inception-v3 (see the module docstring). Randomly initialised; eval mode is all it supports.

    input_size: side length images are resampled to (299 for FID; smaller values, >= 75, only make tests
    cheaper: the network pools globally, so any size the stem accepts works).
    """

    in_channels = 3  # metrics.detectors repeats grayscale images to 3 channels for us

    def __init__(self, num_classes=NUM_CLASSES, input_size=FID_INPUT_SIZE):
        super().__init__()
        if input_size < 75:
            raise ValueError(f"input_size={input_size}: the Inception stem needs at least 75x75 inputs")
        self.input_size = input_size
        self.layers = nn.Sequential()
        stem = [
            ("conv", ConvBN(3, 32, 3, stride=2)),        # 299 -> 149
            ("conv_1", ConvBN(32, 32, 3)),               # -> 147
            ("conv_2", ConvBN(32, 64, 3, padding=1)),
            ("pool0", nn.MaxPool2d(3, stride=2)),        # -> 73
            ("conv_3", ConvBN(64, 80, 1)),
            ("conv_4", ConvBN(80, 192, 3)),              # -> 71
            ("pool1", nn.MaxPool2d(3, stride=2)),        # -> 35
        ]
        for name, module in stem:
            self.layers.add_module(name, module)
        blocks = [MixedA(192, 32)]
        for _ in range(2):
            blocks.append(MixedA(blocks[-1].out_channels, 64))
        blocks.append(ReduceB(blocks[-1].out_channels))                     # -> 17
        blocks += [MixedC(768, mid) for mid in (128, 160, 160, 192)]
        blocks += [ReduceD(768)]                                            # -> 8
        blocks += [MixedE(1280, "avg"), MixedE(2048, "max")]
        for k, block in enumerate(blocks):
            self.layers.add_module("mixed" if k == 0 else f"mixed_{k}", block)
        self.output = nn.Linear(FEATURE_DIM, num_classes)
        self.reset_parameters()
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        """Random weights that keep activations O(1) through all 94 units (He-normal convs, identity norms)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
            elif isinstance(m, ShiftBatchNorm):
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1)
        self.output.weight.normal_(0, FEATURE_DIM ** -0.5, generator=generator)
        self.output.bias.zero_()

    def forward(self, images, return_features=False, use_fp16=False, no_output_bias=False):
        """uint8-valued NCHW images -> pool3 features [N, 2048] (float32), or class probabilities [N, 1008]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {list(images.shape)}")
        x = images.to(torch.float16 if use_fp16 else torch.float32)
        x = resize_like_nvidia(x, self.input_size)
        x = (x - 128) / 128
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=use_fp16):
            x = self.layers(x)
        features = x.float().mean(dim=(2, 3))  # the port's 8x8 average pool at 299 input
        if return_features:
            return features
        logits = F.linear(features, self.output.weight, None if no_output_bias else self.output.bias)
        return logits.softmax(dim=1)

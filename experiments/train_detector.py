"""Train a small Fashion-MNIST classifier and ship it as an offline FID/PRDC feature detector.

The detector is called as `det(images, return_features=True)` with uint8 images [N, 1, H, W] in 0..255 and
returns float32 features; without return_features it returns the 10 class logits. Two feature layers exist:
`--features pool` (the default): the last convolution's ReLU activations averaged over the 4x4 map, as
Inception's pool3 is (256-d with the default widths); `--features fc`: the 128-d linear layer before its ReLU
(the first shipped detector). 32x32 is its native size (Fashion-MNIST padded by 2 black pixels, as dataset_tool.py writes
it); 28x28 images are padded the same way; any other size is resized bilinearly (antialiased) to 32x32. Its
integer attribute `in_channels = 1` tells metrics.detectors not to repeat grayscale images to RGB.
"""

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dataset_tool  # noqa: E402
import dnnlib  # noqa: E402
from metrics.frechet import FeatureStats, save_ref  # noqa: E402

DETECTOR_FILE = "fmnist-detector.pt"
REF_FILE = "fmnist-train-ref.npz"
FEATURE_DIM = 128  # the linear feature layer of --features fc
POOL_DIM = 256  # channels of the last convolution, pooled by --features pool


def conv_block(in_channels, out_channels):
    return [torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(out_channels),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2)]


def network_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [N, 1, H, W] -> float [-1, 1] at the native resolution (28x28 padded black, others resized)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError("the Fashion-MNIST detector takes images [N, 1, H, W]")
    x = images.to(torch.float32) / 127.5 - 1
    if images.shape[2] == 28 and images.shape[3] == 28:
        return F.pad(x, [2, 2, 2, 2], value=-1.0)  # black border, as dataset_tool.py pads
    if images.shape[2] != resolution or images.shape[3] != resolution:
        # The antialiased bilinear op itself, not F.interpolate: scripted, F.interpolate brings every mode's op
        # into the file, and a file naming an op that an older torch lacks does not load there.
        x = torch.ops.aten._upsample_bilinear2d_aa(x, [resolution, resolution], False, None)
    return x


class FMNISTClassifier(torch.nn.Module):
    """`--features fc`: three conv blocks (32 -> 16 -> 8 -> 4 pixels), a 128-d linear feature layer, 10 logits."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.in_channels = 1  # read by metrics.detectors: grayscale goes in as it is
        self.resolution = 32
        self.trunk = torch.nn.Sequential(*conv_block(1, 32), *conv_block(32, 64), *conv_block(64, 128),
                                         torch.nn.Flatten())
        self.features = torch.nn.Linear(128 * 4 * 4, feature_dim)
        self.dropout = torch.nn.Dropout(0.3)
        self.classifier = torch.nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.features(self.trunk(network_input(images, self.resolution)))
        if return_features:
            return features
        return self.classifier(self.dropout(F.relu(features)))


class FMNISTPoolNet(torch.nn.Module):
    """`--features pool`: the same three conv blocks, one more 3x3 convolution (256 channels) at 4x4, then its
    ReLU activations averaged over the map (the features, like Inception's pool3) and a linear classifier.

    A pooled post-ReLU layer describes which parts are present rather than where each pixel is, so it is less
    swayed by pixel-level texture than a layer over the flattened map."""

    def __init__(self, pool_dim: int = POOL_DIM, num_classes: int = 10):
        super().__init__()
        self.in_channels = 1
        self.resolution = 32
        self.trunk = torch.nn.Sequential(*conv_block(1, 32), *conv_block(32, 64), *conv_block(64, 128),
                                         torch.nn.Conv2d(128, pool_dim, 3, padding=1, bias=False),
                                         torch.nn.BatchNorm2d(pool_dim), torch.nn.ReLU())
        self.dropout = torch.nn.Dropout(0.3)
        self.classifier = torch.nn.Linear(pool_dim, num_classes)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.trunk(network_input(images, self.resolution)).mean(dim=[2, 3])
        if return_features:
            return features
        return self.classifier(self.dropout(features))


class PooledTrunk(torch.nn.Module):
    """`--pool_from`: an `fc` detector whose features are its last conv block's ReLU + max-pool output averaged
    over the 4x4 map (128-d, post-ReLU) instead of its linear layer; the logits are the detector's own."""

    def __init__(self, net: FMNISTClassifier):
        super().__init__()
        self.in_channels = 1
        self.resolution = net.resolution
        self.net = net
        self.convs = torch.nn.Sequential(*list(net.trunk.children())[:-1])  # the trunk without its Flatten

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if not return_features:
            return self.net(images)
        return self.convs(network_input(images, self.resolution)).mean(dim=[2, 3])


ARCHITECTURES = {"fc": FMNISTClassifier, "pool": FMNISTPoolNet}


def shift_batch(x, max_shift, generator):
    """uint8 images translated by up to `max_shift` pixels each (augmentation), the border filled black."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, [2, n], generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def padded_split(source, split):
    """(uint8 [N, 1, 32, 32], int64 [N]) of a Fashion-MNIST split, padded as dataset_tool.py writes it."""
    images, labels = dataset_tool.load_fmnist(source, split)
    pad = dataset_tool.PAD
    images = np.pad(images, [(0, 0), (pad, pad), (pad, pad)], mode="constant", constant_values=0)
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def accuracy(net, images, labels, batch=1000):
    net.eval()
    correct = sum(int((net(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                  for i in range(0, len(images), batch))
    return correct / len(images)


@torch.no_grad()
def feature_stats(net, images, batch=1000):
    stats = FeatureStats()
    for i in range(0, len(images), batch):
        stats.add(net(images[i:i + batch], return_features=True))
    return stats


def export_torchscript(net, path):
    """Save `net` with torch.jit.script (trace would drop the in_channels attribute), atomically."""
    scripted = torch.jit.script(net.cpu().eval())
    tmp = f"{path}.tmp"
    torch.jit.save(scripted, tmp)
    os.replace(tmp, path)
    return scripted


@click.command()
@click.option("--outdir", default="assets", show_default=True, metavar="DIR",
              help=f"Where {DETECTOR_FILE} and {REF_FILE} are written.")
@click.option("--source", default=None, metavar="DIR",
              help=f"Folder with the Fashion-MNIST idx files.  [default: {dataset_tool.FMNIST_DEBIAN_DIR} when "
                   f"installed, else downloaded once into ./{dataset_tool.FMNIST_CACHE_DIR}/]")
@click.option("--features", "feature_layer", type=click.Choice(sorted(ARCHITECTURES)), default="fc",
              show_default=True, help="Feature layer: 'fc' (linear, 128-d) or 'pool' (pooled post-ReLU, 256-d).")
@click.option("--pool_from", default=None, metavar="PT",
              help="No training: re-export this 'fc' detector with pooled post-ReLU trunk features (128-d).")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, metavar="INT",
              help="Passes over the 60k training images.")
@click.option("--shift", type=click.IntRange(min=0), default=0, show_default=True, metavar="PIXELS",
              help="Augmentation: random translation of each training image by up to this many pixels.")
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True, metavar="INT", help="Batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True, metavar="FLOAT",
              help="Adam learning rate (cosine decay to 0 over the run).")
@click.option("--seed", type=int, default=0, show_default=True, metavar="INT", help="Seed of weights and batches.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="INT",
              help="torch CPU threads.  [default: torch's choice]")
def main(outdir, source, feature_layer, pool_from, epochs, shift, batch, lr, seed, threads):
    """Train the Fashion-MNIST detector, report its test accuracy, write it and the training-set statistics.

    \b
    # assets/fmnist-detector.pt (TorchScript) and assets/fmnist-train-ref.npz (mu/sigma of the features of
    # the 60k training images); idx files from the Debian package dataset-fashion-mnist or ./src/fmnist/
    python experiments/train_detector.py --outdir=assets --threads=1

    \b
    # FID of generated images against the training set, offline
    python fid.py calc --images=samples/fmnist --ref=assets/fmnist-train-ref.npz --detector=assets/fmnist-detector.pt
    """
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        folder = source if source is not None else dataset_tool.default_source()
    except dnnlib.util.DownloadError as e:
        raise click.ClickException(str(e)) from None
    try:
        train_x, train_y = padded_split(folder, "train")
        test_x, test_y = padded_split(folder, "test")
    except dataset_tool.IdxError as e:
        raise click.BadParameter(str(e), param_hint="--source") from None
    print(f"Fashion-MNIST from {folder}: {len(train_x)} training, {len(test_x)} test images", flush=True)

    if pool_from is not None:
        fc = FMNISTClassifier()
        fc.load_state_dict(torch.jit.load(pool_from).state_dict())
        net, epochs, feature_layer = PooledTrunk(fc.eval()), 0, f"pooled trunk of {pool_from}"
    else:
        torch.manual_seed(seed)
        net = ARCHITECTURES[feature_layer]()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = len(train_x) // batch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(net(shift_batch(train_x[idx], shift, generator)), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        acc = accuracy(net, test_x, test_y)
        print(f"epoch {epoch + 1}/{epochs}  train loss {np.mean(losses):.4f}  test accuracy {acc:.4f}  "
              f"elapsed {time.time() - start:.0f}s", flush=True)

    os.makedirs(outdir, exist_ok=True)
    detector_path = os.path.join(outdir, DETECTOR_FILE)
    scripted = export_torchscript(net, detector_path)
    # Statistics from the exported file itself, so they match what fid.py computes with it.
    mu, sigma = feature_stats(scripted, train_x).mean_cov()
    ref_path = os.path.join(outdir, REF_FILE)
    save_ref(ref_path, mu, sigma)
    print(f"Test accuracy {accuracy(scripted, test_x, test_y):.4f}; wrote {detector_path} "
          f"({os.path.getsize(detector_path) / 1e6:.2f} MB) and {ref_path} ({len(train_x)} images, "
          f"{mu.shape[0]} features, --features {feature_layer})", flush=True)


if __name__ == "__main__":
    main()

"""Train a small Fashion-MNIST classifier and ship it as an offline FID/PRDC feature detector.

The detector is called as `det(images, return_features=True)` with uint8 images [N, 1, H, W] in 0..255 and
returns the 128-d penultimate activations (before the ReLU) in float32; without return_features it returns the
10 class logits. 32x32 is its native size (Fashion-MNIST padded by 2 black pixels, as dataset_tool.py writes
it); 28x28 images are padded the same way; any other size is resized bilinearly (antialiased) to 32x32. Its
integer attribute `in_channels = 1` tells metrics.detectors not to repeat grayscale images to RGB.
"""

import os
import time

import click
import numpy as np
import torch
import torch.nn.functional as F

import dataset_tool
import dnnlib
from metrics.frechet import FeatureStats, save_ref

DETECTOR_FILE = "fmnist-detector.pt"
REF_FILE = "fmnist-train-ref.npz"
FEATURE_DIM = 128


def conv_block(in_channels, out_channels):
    return [torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(out_channels),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2)]


class FMNISTClassifier(torch.nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 pixels), a 128-d feature layer, 10 logits."""

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
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError("the Fashion-MNIST detector takes images [N, 1, H, W]")
        x = images.to(torch.float32) / 127.5 - 1  # uint8 0..255 -> [-1, 1]
        if images.shape[2] == 28 and images.shape[3] == 28:
            x = F.pad(x, [2, 2, 2, 2], value=-1.0)  # black border, as dataset_tool.py pads
        elif images.shape[2] != self.resolution or images.shape[3] != self.resolution:
            x = F.interpolate(x, size=[self.resolution, self.resolution], mode="bilinear", align_corners=False,
                              antialias=True)
        features = self.features(self.trunk(x))
        if return_features:
            return features
        return self.classifier(self.dropout(F.relu(features)))


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
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, metavar="INT",
              help="Passes over the 60k training images.")
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True, metavar="INT", help="Batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True, metavar="FLOAT",
              help="Adam learning rate (cosine decay to 0 over the run).")
@click.option("--seed", type=int, default=0, show_default=True, metavar="INT", help="Seed of weights and batches.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="INT",
              help="torch CPU threads.  [default: torch's choice]")
def main(outdir, source, epochs, batch, lr, seed, threads):
    """Train the Fashion-MNIST detector, report its test accuracy, write it and the training-set statistics.

    \b
    # assets/fmnist-detector.pt (TorchScript) and assets/fmnist-train-ref.npz (mu/sigma of the features of
    # the 60k training images); idx files from the Debian package dataset-fashion-mnist or ./src/fmnist/
    python train_detector.py --outdir=assets --threads=1

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

    torch.manual_seed(seed)
    net = FMNISTClassifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = len(train_x) // batch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
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
          f"{mu.shape[0]} features)", flush=True)


if __name__ == "__main__":
    main()

"""Make EDM-style datasets (a zip or folder of PNGs + `dataset.json` labels); today: Fashion-MNIST.

The layout is EDM's (`NVlabs/edm` dataset_tool.py): image i is `{i:08d}`[:5]/img{i:08d}.png, and
`dataset.json` holds {"labels": [[file name, class index], ...]}, so EDM's ImageFolderDataset and our
`training.dataset` both read it.
"""

import gzip
import io
import json
import os
import tempfile
import zipfile

import click
import numpy as np
import PIL.Image

import dnnlib
from torch_utils import cli
from torch_utils.cli import CommandError

FMNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package `dataset-fashion-mnist`
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"  # the official mirror (zalandoresearch)
FMNIST_CACHE_DIR = os.path.join("src", "fmnist")
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PAD = 2  # 28x28 -> 32x32, as EDM's tool pads MNIST


class IdxError(ValueError):
    """An idx file is missing, truncated or not an idx file of unsigned bytes."""


# ----------------------------------------------------------------------------
# The idx format (LeCun's MNIST files): 2 zero bytes, a type code (0x08 = unsigned byte), the number of
# dimensions, then one big-endian uint32 per dimension, then the data in C order.


def read_idx(path):
    """An idx file (plain or .gz) as a uint8 numpy array of its recorded shape."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise IdxError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise IdxError(f"{path}: broken gzip stream ({e}); the file is probably truncated") from None
    if len(raw) < 4:
        raise IdxError(f"{path}: truncated, {len(raw)} bytes is shorter than the 4-byte idx magic number")
    magic = int.from_bytes(raw[:4], "big")
    zeros, type_code, ndim = raw[:2], raw[2], raw[3]
    if zeros != b"\x00\x00" or type_code != 0x08 or not 1 <= ndim <= 4:
        raise IdxError(f"{path}: bad magic number 0x{magic:08x}; an idx file of unsigned bytes starts with "
                       f"0x0000080N (N = number of dimensions, 1..4)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated inside the header ({len(raw)} of {header} bytes)")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise IdxError(f"{path}: {what}: shape {shape} needs {expected} bytes, the file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(folder, name):
    """`name` (…-ubyte.gz) in `folder`, or its uncompressed twin."""
    for candidate in (name, name[:-3] if name.endswith(".gz") else name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise IdxError(f"{folder}: missing {name} (or its uncompressed form)")


def load_fmnist(folder, split="train"):
    """(images uint8 [N, 28, 28], labels uint8 [N]) of a Fashion-MNIST split from the idx files in `folder`."""
    images_name, labels_name = FMNIST_FILES[split]
    images_path, labels_path = find_idx(folder, images_name), find_idx(folder, labels_name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IdxError(f"{images_path}: expected images of shape [N, 28, 28], found {list(images.shape)}")
    if labels.ndim != 1:
        raise IdxError(f"{labels_path}: expected a 1-d label file, found shape {list(labels.shape)}")
    if len(images) != len(labels):
        raise IdxError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if labels.size and labels.max() >= len(FMNIST_CLASSES):
        raise IdxError(f"{labels_path}: label {int(labels.max())} is outside 0..{len(FMNIST_CLASSES) - 1}")
    return images, labels


def fetch_fmnist(cache_dir=FMNIST_CACHE_DIR):
    """The official files, downloaded once into `cache_dir`; returns that folder."""
    for names in FMNIST_FILES.values():
        for name in names:
            dnnlib.download_file(f"{FMNIST_URL}/{name}", cache_dir, file_name=name)
    return cache_dir


def _has_all_files(folder):
    return all(os.path.isfile(os.path.join(folder, n)) for names in FMNIST_FILES.values() for n in names)


def default_source():
    """The Debian package's folder when it is installed, else the download cache (filled on demand)."""
    if _has_all_files(FMNIST_DEBIAN_DIR):
        return FMNIST_DEBIAN_DIR
    return fetch_fmnist()


def check_source(source, split):
    """--source: an existing folder holding the split's two idx files (looked for, not read); without it, the
    download cache must be writable when files are missing."""
    if source is None:
        if not _has_all_files(FMNIST_DEBIAN_DIR) and not _has_all_files(FMNIST_CACHE_DIR):
            try:
                cli.check_output_dir(FMNIST_CACHE_DIR, "--source")
            except click.BadParameter as e:
                raise click.BadParameter(
                    f"not given, so the files would be downloaded into ./{FMNIST_CACHE_DIR}, but "
                    f"{e.message.split(';')[0]}; run where ./src can be written, or give --source=DIR with the idx files",
                    param_hint="--source") from None
        return
    if not os.path.exists(source):
        raise click.BadParameter(f"no such folder: {source}; give the folder holding the idx files",
                                 param_hint="--source")
    if not os.path.isdir(source):
        raise click.BadParameter(f"{source} is a file; give the folder holding the idx files", param_hint="--source")
    try:
        for name in FMNIST_FILES[split]:
            find_idx(source, name)
    except IdxError as e:
        raise click.BadParameter(str(e), param_hint="--source") from None


def check_dest(dest):
    """--dest: a .zip file that can be written (its folder made if missing), or a new or empty folder."""
    if dest.lower().endswith(".zip"):
        cli.check_output_file(dest, "--dest")
        return
    cli.check_output_dir(dest, "--dest")
    if os.path.isdir(dest) and os.listdir(dest):
        raise click.BadParameter(f"folder {dest} is not empty; give an empty or new folder, or a .zip",
                                 param_hint="--dest")


# ----------------------------------------------------------------------------
# Writing an EDM-style dataset.


def image_name(index):
    idx = f"{index:08d}"
    return f"{idx[:5]}/img{idx}.png"


def encode_png(image):
    buf = io.BytesIO()
    # Uncompressed PNG, as EDM writes them: decoding is the bottleneck when a trainer reads the zip.
    PIL.Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(buf, format="png", compress_level=0)
    return buf.getvalue()


def write_dataset(dest, images, labels):
    """Write images (uint8 [N, H, W]) and labels as an EDM-style zip (dest ends in .zip) or folder."""
    labels_json = json.dumps({"labels": [[image_name(i), int(l)] for i, l in enumerate(labels)]})
    if dest.lower().endswith(".zip"):
        folder = os.path.dirname(os.path.abspath(dest))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
                for i, image in enumerate(images):
                    z.writestr(image_name(i), encode_png(image))
                z.writestr("dataset.json", labels_json)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
            os.replace(tmp, dest)  # a killed run never leaves a half-written zip under the final name
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    check_dest(dest)
    for i, image in enumerate(images):
        path = os.path.join(dest, image_name(i))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(encode_png(image))
    with open(os.path.join(dest, "dataset.json"), "w") as f:
        f.write(labels_json)


# ----------------------------------------------------------------------------


@click.group()
def main():
    """Make EDM-style datasets (zip or folder of PNGs + dataset.json labels).

    \b
    # The 60k Fashion-MNIST training images, 32x32 grayscale (28x28 padded by 2 black pixels), from
    # the Debian package dataset-fashion-mnist when installed, else downloaded once into ./src/fmnist/
    python dataset_tool.py fmnist --dest=datasets/fmnist-32x32.zip

    \b
    # The 10k test images, from idx files in a folder of your own
    python dataset_tool.py fmnist --source=path/to/idx --split=test --dest=datasets/fmnist-test-32x32.zip
    """


@main.command()
@click.option("--dest", required=True, metavar="ZIP|DIR",
              help="Output: a .zip file, or an empty/new folder.")
@click.option("--source", default=None, metavar="DIR",
              help=f"Folder with the idx files (train-images-idx3-ubyte.gz, ...; .gz or not).  [default: "
                   f"{FMNIST_DEBIAN_DIR} when installed, else downloaded once into ./{FMNIST_CACHE_DIR}/]")
@click.option("--split", type=click.Choice(sorted(FMNIST_FILES)), default="train", show_default=True,
              help="Which Fashion-MNIST split to convert.")
@click.option("--max-images", "max_images", type=click.IntRange(min=1), default=None, metavar="INT",
              help="Keep only the first INT images.  [default: all]")
def fmnist(dest, source, split, max_images):
    """Fashion-MNIST -> 32x32 grayscale PNGs (2-pixel black border) with class labels 0..9."""
    check_dest(dest)
    check_source(source, split)
    try:
        folder = source if source is not None else default_source()
    except dnnlib.util.DownloadError as e:
        raise CommandError(str(e)) from None
    try:
        images, labels = load_fmnist(folder, split)
    except IdxError as e:
        raise click.BadParameter(str(e), param_hint="--source") from None
    if max_images is not None:
        images, labels = images[:max_images], labels[:max_images]
    images = np.pad(images, [(0, 0), (PAD, PAD), (PAD, PAD)], mode="constant", constant_values=0)
    write_dataset(dest, images, labels)
    print(f"Wrote {len(images)} images of {images.shape[2]}x{images.shape[1]}x1 ({split} split of {folder}) "
          f"with labels to {dest}")


if __name__ == "__main__":
    cli.run(main)

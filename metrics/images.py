"""Read a folder or a zip of PNG/JPG images as uint8 NCHW batches, split over ranks.

The file list is sorted, so every process sees the same order; a random subset (``num`` < count)
is drawn with ``numpy.random.RandomState(seed)`` and kept in sorted order, the selection rule EDM's
``ImageFolderDataset(max_size=..., random_seed=...)`` uses, so ``--num/--seed`` pick the same files.
All images must share one height, width and channel count (1 = grayscale, 3 = RGB); the first
selected file is the reference every other file is checked against.
"""

import os
import zipfile

import numpy as np
import PIL.Image
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageSourceError(ValueError):
    """The image folder/zip is missing, empty or inconsistent."""


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder (searched recursively) or a zip file, in sorted name order.

    ``num``/``seed`` select a random subset (see ``select_indices``); item i is a uint8 tensor
    [C, H, W] of the i-th selected image.
    The zip is opened lazily per process, so the object can be sent to DataLoader workers.
    """

    def __init__(self, path, num=None, seed=0):
        self.path = str(path)
        if os.path.isdir(self.path):
            self.is_zip = False
            names = []
            for root, _dirs, files in os.walk(self.path):
                for f in files:
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        names.append(os.path.relpath(os.path.join(root, f), self.path))
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self.is_zip = True
            with zipfile.ZipFile(self.path) as z:
                names = [n for n in z.namelist() if n.lower().endswith(IMAGE_EXTENSIONS) and not n.endswith("/")]
        elif os.path.exists(self.path):
            raise ImageSourceError(f"{self.path} is neither a folder nor a zip file of images")
        else:
            raise ImageSourceError(f"{self.path}: no such folder or zip file")
        if not names:
            raise ImageSourceError(f"no PNG/JPG images found in {self.path}")
        self.all_names = sorted(names, key=lambda n: n.replace(os.sep, "/"))
        self.indices = select_indices(len(self.all_names), num, seed)
        self._zip = None
        self._zip_pid = None
        self._ref_shape = None

    @property
    def num_available(self):
        return len(self.all_names)

    def __getstate__(self):
        # An open ZipFile cannot travel to a spawned DataLoader worker; each process reopens it.
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def __len__(self):
        return len(self.indices)

    def name(self, i):
        return self.all_names[self.indices[i]]

    def _open(self, name):
        if not self.is_zip:
            return open(os.path.join(self.path, name), "rb")
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip.open(name, "r")

    def read(self, name):
        """One image as a uint8 array [C, H, W]."""
        try:
            with self._open(name) as f:
                img = PIL.Image.open(f)
                img.load()
        except (OSError, SyntaxError) as e:
            raise ImageSourceError(f"cannot read image {name} in {self.path}: {e}") from None
        if img.mode not in ("L", "RGB"):
            # Palette/alpha images become RGB; other single-band modes (1, I;16, F) become L.
            img = img.convert("L" if len(img.getbands()) == 1 else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def reference_shape(self):
        """[C, H, W] of the first selected image: the size every image must have."""
        if self._ref_shape is None:
            self._ref_shape = self.read(self.name(0)).shape
        return self._ref_shape

    def __getitem__(self, i):
        arr = self.read(self.name(i))
        ref = self.reference_shape()
        if arr.shape != ref:
            raise ImageSourceError(
                f"mixed image sizes in {self.path}: {self.name(i)} is {_fmt(arr.shape)} but "
                f"{self.name(0)} is {_fmt(ref)}; all images must have the same size and channels"
            )
        return torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)


def _fmt(chw):
    c, h, w = chw
    return f"{w}x{h} with {c} channel{'s' if c > 1 else ''}"


def select_indices(num_available, num=None, seed=0):
    """Sorted indices of the images to use: all, or ``num`` drawn at random with ``seed``."""
    idx = np.arange(num_available, dtype=np.int64)
    if num is None or num >= num_available:
        return idx
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    np.random.RandomState(seed % (1 << 31)).shuffle(idx)
    return np.sort(idx[:num])


def rank_batches(num_items, batch_size, rank=0, world_size=1):
    """Index batches of this rank: the items are cut into a multiple of world_size near-equal
    batches of at most batch_size, dealt round-robin, so every rank runs the same number of batches
    (some possibly empty) and together they cover each item exactly once."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    num_batches = ((num_items - 1) // (batch_size * world_size) + 1) * world_size if num_items > 0 else world_size
    batches = torch.arange(num_items).tensor_split(num_batches)
    return [b.tolist() for b in batches[rank::world_size]]


def _collate(items):
    return torch.stack(items) if items else torch.zeros([0], dtype=torch.uint8)


def iterate_images(images, batch_size, rank=0, world_size=1, num_workers=0):
    """Yield this rank's uint8 NCHW batches of ``images`` (an ImageFiles); empty batches are skipped."""
    images.reference_shape()  # fail early, in the main process, on an unreadable first image
    batches = [b for b in rank_batches(len(images), batch_size, rank, world_size) if b]
    if not batches:
        return
    if num_workers == 0:
        for b in batches:
            yield _collate([images[i] for i in b])
        return
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate, prefetch_factor=2
    )
    yield from loader


def psnr_uint8(images, reference):
    """Mean per-image PSNR (dB) of uint8 images against uint8 references of the same shape. The MSE is floored at
    1e-10, so an identical image scores 10·log10(255² / 1e-10) = 148.13 dB instead of infinity."""
    if images.shape != reference.shape:
        raise ValueError(f"PSNR needs equal shapes, got {tuple(images.shape)} and {tuple(reference.shape)}")
    mse = (images.double() - reference.double()).square().flatten(1).mean(1)
    return float((10 * torch.log10(255.0 ** 2 / mse.clamp(min=1e-10))).mean())

"""An EDM-style image dataset (zip or folder of PNGs, optional `dataset.json` labels) held in memory.

The layout is the one `dataset_tool.py` (ours and EDM's) writes: images in sorted file-name order, and
`dataset.json` = {"labels": [[file name, label], ...]} or {"labels": null}. A label is a class index or
a vector; class indices become an int64 tensor [N], vectors a float32 tensor [N, D].
Small datasets (Fashion-MNIST: 60k x 1 x 32 x 32 = 61 MB) are decoded once into one uint8 tensor, so the
teacher trainer draws batches without a DataLoader.
"""

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from metrics.images import ImageFiles, ImageSourceError


class DatasetError(ValueError):
    """The dataset is missing, unreadable, or its labels do not match its images."""


@dataclass
class ImageDataset:
    images: torch.Tensor        # uint8 [N, C, H, W]
    labels: torch.Tensor = None  # int64 [N] class indices, float32 [N, D] vectors, or None
    path: str = None

    def __len__(self):
        return self.images.shape[0]

    @property
    def resolution(self):
        return self.images.shape[-1]

    @property
    def channels(self):
        return self.images.shape[1]

    @property
    def label_dim(self):
        if self.labels is None:
            return 0
        return int(self.labels.max()) + 1 if self.labels.ndim == 1 else self.labels.shape[1]


def load_image_dataset(path, max_size=None):
    """Decode every image of `path` (zip or folder; the first `max_size` in name order) into memory."""
    try:
        files = ImageFiles(path)
    except ImageSourceError as e:
        raise DatasetError(str(e)) from None
    names = files.all_names[:max_size] if max_size is not None else files.all_names
    try:
        first = files.read(names[0])
        images = np.empty([len(names), *first.shape], dtype=np.uint8)
        for i, name in enumerate(names):
            image = files.read(name)
            if image.shape != first.shape:
                raise DatasetError(f"{path}: {name} has shape {list(image.shape)} but {names[0]} has "
                                   f"{list(first.shape)}; all images must share one size and channel count")
            images[i] = image
    except ImageSourceError as e:
        raise DatasetError(str(e)) from None
    if images.shape[2] != images.shape[3]:
        raise DatasetError(f"{path}: images are {images.shape[3]}x{images.shape[2]}; square images are needed")
    labels = _read_labels(path, files.is_zip, names)
    return ImageDataset(images=torch.from_numpy(images), labels=labels, path=str(path))


def _read_labels(path, is_zip, names):
    raw = None
    if is_zip:
        with zipfile.ZipFile(path) as z:
            if "dataset.json" in z.namelist():
                raw = z.read("dataset.json")
    elif os.path.isfile(os.path.join(path, "dataset.json")):
        with open(os.path.join(path, "dataset.json"), "rb") as f:
            raw = f.read()
    if raw is None:
        return None
    try:
        entries = json.loads(raw).get("labels")
    except (ValueError, AttributeError):
        raise DatasetError(f"{path}: dataset.json is not a JSON object with a 'labels' entry") from None
    if entries is None:
        return None
    try:
        table = {str(name).replace("\\", "/"): label for name, label in entries}
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: dataset.json 'labels' must be a list of [file name, label] pairs") from None
    missing = [n for n in names if n.replace(os.sep, "/") not in table]
    if missing:
        raise DatasetError(f"{path}: dataset.json has no label for {missing[0]} ({len(missing)} images unlabelled)")
    values = np.asarray([table[n.replace(os.sep, "/")] for n in names])
    if values.ndim == 1:
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0:
            raise DatasetError(f"{path}: class labels in dataset.json must be non-negative integers")
        return torch.from_numpy(values.astype(np.int64))
    if values.ndim == 2 and np.issubdtype(values.dtype, np.number):
        return torch.from_numpy(values.astype(np.float32))
    raise DatasetError(f"{path}: labels in dataset.json must be class indices or equal-length vectors")

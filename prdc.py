"""Precision, recall, density and coverage (Naeem et al. 2020) of generated images against reference images."""

import click
import torch

from fid import check_detector, common_options, default_workers, get_detector, open_images
from metrics.detectors import iterate_features, one_line
from metrics.images import ImageSourceError
from metrics.prdc import NEAREST_K, compute_prdc, gather_rows
from torch_utils import cli
from torch_utils import distributed as dist


def image_features(images, detector, batch, device, num_workers=0):
    """Features [N, D] of all images, gathered on every rank (float64)."""
    parts = list(iterate_features(
        detector, images, batch, device=device, rank=dist.get_rank(), world_size=dist.get_world_size(),
        num_workers=num_workers, progress=dist.get_rank() == 0,
    ))
    local = torch.cat(parts) if parts else None
    return gather_rows(local, device=device)


@click.group()
def main():
    """Calculate precision, recall, density and coverage (PRDC).

    \b
    python prdc.py calc --images=samples/cifar10 --images_ref=datasets/cifar10-32x32.zip
    torchrun --standalone --nproc_per_node=4 prdc.py calc --images=samples/cifar10 \\
        --images_ref=datasets/cifar10-32x32.zip --nearest_k=5 --num=10000
    """


@main.command()
@click.option("--images", "images_path", required=True, metavar="DIR|ZIP",
              help="Folder (searched recursively) or zip of generated PNG/JPG images.")
@click.option("--images_ref", "ref_path", required=True, metavar="DIR|ZIP",
              help="Folder or zip of reference (real) PNG/JPG images.")
@click.option("--nearest_k", type=click.IntRange(min=1), default=NEAREST_K, show_default=True, metavar="INT",
              help="k of the k-nearest-neighbour balls.")
@click.option("--num", type=click.IntRange(min=2), default=10000, show_default=True, metavar="INT",
              help="At most this many images per side, drawn at random with --seed.")
@click.option("--seed", type=int, default=0, show_default=True, metavar="INT",
              help="Random seed for choosing the images of each side.")
@common_options
def calc(images_path, ref_path, nearest_k, num, seed, detector, batch, workers, cache, device):
    """Calculate precision, recall, density and coverage of a set of images."""
    device = cli.check_device(device)
    workers = default_workers() if workers is None else workers
    if nearest_k >= num:
        raise click.BadParameter(f"--nearest_k={nearest_k} needs more than {nearest_k} images per side but --num={num} "
                                 f"keeps at most {num}; lower --nearest_k or raise --num", param_hint="--nearest_k")
    check_detector(detector, cache)
    fake_images = open_images(images_path, "--images", num=num, seed=seed, at_most=True)
    real_images = open_images(ref_path, "--images_ref", num=num, seed=seed, at_most=True)
    for imgs, option in ((fake_images, "--images"), (real_images, "--images_ref")):
        if len(imgs) <= nearest_k:
            raise click.BadParameter(
                f"{len(imgs)} images are too few for --nearest_k={nearest_k}; need more than k, or lower --nearest_k",
                param_hint=option,
            )
    device = dist.init(device)
    dist.print0(f"Loading detector {detector or 'Inception-v3 (NVIDIA)'}...")
    det = get_detector(detector, device, cache)
    feats = {}
    for key, imgs, option, path in (("fake", fake_images, "--images", images_path),
                                    ("real", real_images, "--images_ref", ref_path)):
        dist.print0(f"Computing features of {len(imgs)} images from {path}...")
        try:
            feats[key] = image_features(imgs, det, batch, device, num_workers=workers)
        except ImageSourceError as e:
            raise click.BadParameter(one_line(e), param_hint=option) from None
        except ValueError as e:
            raise click.BadParameter(one_line(e), param_hint="--detector") from None
    if dist.get_rank() == 0:
        scores = compute_prdc(feats["real"], feats["fake"], nearest_k=nearest_k)
        for name in ("precision", "recall", "density", "coverage"):
            print(f"{name}: {scores[name]:.5f}", flush=True)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    cli.run(main)

"""Fréchet Inception Distance (FID) of a folder or zip of images against reference statistics."""

import os

import click

import dnnlib
from metrics.detectors import iterate_features, load_detector_rank0_first, one_line
from metrics.frechet import FeatureStats, frechet_distance, load_ref, save_ref
from metrics.images import ImageFiles, ImageSourceError
from torch_utils import cli
from torch_utils.cli import CommandError
from torch_utils import distributed as dist

DETECTOR_HELP = (
    "Feature network: a TorchScript file (.pt/.pth/.ts, called as net(uint8 NCHW, return_features=True) "
    "-> [N, D]), an NVIDIA .pkl, or a URL of either. Grayscale images are repeated to 3 channels unless "
    "the network has an int attribute in_channels == 1.  [default: NVIDIA Inception-v3, "
    "inception-2015-12-05.pkl, downloaded once to CACHE/metrics/]"
)


def image_stats(images, detector, batch, device, num_workers=0):
    """FeatureStats of all images (each rank computes its share, then the sums are merged)."""
    stats = FeatureStats(device)
    features = iterate_features(
        detector, images, batch, device=device, rank=dist.get_rank(), world_size=dist.get_world_size(),
        num_workers=num_workers, progress=dist.get_rank() == 0,
    )
    for f in features:
        stats.add(f)
    return stats.all_reduce()


def open_images(path, option, num=None, seed=0, at_most=False):
    """ImageFiles of path (num of them, or at most num with at_most) with a one-line click error
    naming the option when the folder is unusable."""
    try:
        images = ImageFiles(path, num=num, seed=seed)
    except ImageSourceError as e:
        raise click.BadParameter(one_line(e), param_hint=option) from None
    if num is not None and num > images.num_available and not at_most:
        raise click.BadParameter(
            f"--num={num} but {path} holds only {images.num_available} images; lower --num", param_hint="--num"
        )
    if len(images) < 2:
        raise click.BadParameter(f"{path} holds {len(images)} image; statistics need at least 2", param_hint=option)
    return images


def get_detector(spec, device, cache):
    try:
        return load_detector_rank0_first(spec, device=device, cache_root=cache)
    except dnnlib.util.DownloadError as e:
        raise CommandError(one_line(e)) from None
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--detector") from None


def compute_stats_or_fail(images, detector, batch, device, workers, option):
    try:
        return image_stats(images, detector, batch, device, num_workers=workers)
    except ImageSourceError as e:  # also when raised inside a DataLoader worker
        raise click.BadParameter(one_line(e), param_hint=option) from None
    except ValueError as e:  # e.g. grayscale images for a 1-channel detector mismatch
        raise click.BadParameter(one_line(e), param_hint="--detector") from None


# ----------------------------------------------------------------------------------------------


@click.group()
def main():
    """Calculate Fréchet Inception Distance (FID).

    \b
    # Reference statistics of a dataset (a folder or zip of PNG/JPG images)
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    \b
    # FID of generated images, on 4 GPUs
    torchrun --standalone --nproc_per_node=4 fid.py calc --images=samples/cifar10 \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # With another feature network (TorchScript), appending a line to a results file
    python fid.py calc --images=samples/fmnist --ref=fmnist.npz --detector=fmnist_classifier.pt \\
        --results=results.tsv --label=sfd-nfe2
    """


def common_options(fn):
    fn = click.option("--cache", default="./src", show_default=True, metavar="DIR",
                      help="Download cache root; the detector and reference URLs go to DIR/metrics/.")(fn)
    fn = click.option("--workers", type=click.IntRange(min=0), default=3, show_default=True, metavar="INT",
                      help="Image-decoding worker processes per rank (0 = decode in the main process).")(fn)
    fn = click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, metavar="INT",
                      help="Images per detector call on each rank.")(fn)
    fn = click.option("--detector", default=None, metavar="PATH|URL", help=DETECTOR_HELP)(fn)
    return fn


@main.command()
@click.option("--images", "images_path", required=True, metavar="DIR|ZIP",
              help="Folder (searched recursively) or zip of PNG/JPG images to evaluate.")
@click.option("--ref", "ref_path", required=True, metavar="NPZ|URL",
              help="Reference statistics: an .npz with arrays mu and sigma (from 'fid.py ref'), or its URL.")
@click.option("--num", type=click.IntRange(min=2), default=None, metavar="INT",
              help="Use this many images, drawn at random with --seed.  [default: all images]")
@click.option("--seed", type=int, default=0, show_default=True, metavar="INT",
              help="Random seed for choosing the --num images.")
@click.option("--results", "results_path", default=None, metavar="FILE",
              help="Append one line 'label<TAB>fid<TAB>num<TAB>images' to FILE.  [default: none]")
@click.option("--label", default=None, metavar="TEXT",
              help="Label of the --results line.  [default: the --images path]")
@common_options
def calc(images_path, ref_path, num, seed, results_path, label, detector, batch, workers, cache):
    """Calculate the FID of a set of images against reference statistics."""
    device = dist.init()
    images = open_images(images_path, "--images", num=num, seed=seed)
    try:
        ref_mu, ref_sigma = load_ref(ref_path, cache_dir=os.path.join(cache, "metrics"))
    except dnnlib.util.DownloadError as e:
        raise CommandError(one_line(e)) from None
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--ref") from None
    dist.print0(f"Loading detector {detector or 'Inception-v3 (NVIDIA)'}...")
    det = get_detector(detector, device, cache)
    dist.print0(f"Computing features of {len(images)} images from {images_path}...")
    stats = compute_stats_or_fail(images, det, batch, device, workers, "--images")
    mu, sigma = stats.mean_cov()
    try:
        fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--ref") from None
    if dist.get_rank() == 0:
        print(f"FID: {fid:.6g}", flush=True)
        if results_path:
            line = f"{label if label is not None else images_path}\t{fid:.6g}\t{stats.num}\t{images_path}\n"
            with open(results_path, "a") as f:
                f.write(line)
    dist.barrier()
    dist.shutdown()


@main.command()
@click.option("--data", "data_path", required=True, metavar="DIR|ZIP",
              help="Dataset images: a folder (searched recursively) or zip of PNG/JPG images.")
@click.option("--dest", "dest_path", required=True, metavar="NPZ",
              help="Output .npz with float64 arrays mu [D] and sigma [D, D].")
@common_options
def ref(data_path, dest_path, detector, batch, workers, cache):
    """Calculate reference statistics (mu, sigma) of a dataset for 'calc'."""
    device = dist.init()
    images = open_images(data_path, "--data")
    dist.print0(f"Loading detector {detector or 'Inception-v3 (NVIDIA)'}...")
    det = get_detector(detector, device, cache)
    dist.print0(f"Computing features of {len(images)} images from {data_path}...")
    stats = compute_stats_or_fail(images, det, batch, device, workers, "--data")
    mu, sigma = stats.mean_cov()
    if dist.get_rank() == 0:
        save_ref(dest_path, mu, sigma)
        print(f"Saved statistics of {stats.num} images ({mu.shape[0]} features) to {dest_path}", flush=True)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    cli.run(main)

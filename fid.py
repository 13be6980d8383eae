"""Fréchet Inception Distance (FID) of a folder or zip of images against reference statistics."""

import os

import click

import dnnlib
from metrics.detectors import (DEFAULT_DETECTOR_URL, compute_features, detector_format, iterate_features,
                               load_detector_rank0_first, one_line)
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


def default_workers():
    """Decoding workers per rank when --workers is not given: 3, but at most the CPU cores this process may use
    less one (torch warns when a DataLoader has more workers than cores), and at least 0."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        cores = os.cpu_count() or 1
    return max(0, min(3, cores - 1))


# --- checks made before anything loads: one line naming the option, exit code 2, nothing written ---------------


def check_download_cache(url, cache):
    """--cache must be a folder this process can write when `url` is not cached in CACHE/metrics/ yet."""
    cache_dir = os.path.join(cache, "metrics")
    if not os.path.isfile(os.path.join(cache_dir, dnnlib.util._file_name_from_url(url))):
        cli.check_output_dir(cache_dir, "--cache")


def check_detector(spec, cache):
    """--detector: a readable TorchScript/.pkl file, or a URL (the built-in one for None) whose download --cache
    can take."""
    if spec is None or "://" in str(spec):
        check_download_cache(spec or DEFAULT_DETECTOR_URL, cache)
        return
    cli.check_input_file(spec, "--detector")
    try:
        detector_format(spec)
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--detector") from None


def read_ref(ref_path, cache):
    """(mu, sigma) of --ref, a local .npz or a URL (downloaded once into CACHE/metrics/)."""
    try:
        return load_ref(ref_path, cache_dir=os.path.join(cache, "metrics"))
    except dnnlib.util.DownloadError as e:
        raise CommandError(one_line(e)) from None
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--ref") from None


def check_not_same_file(path, option, other_path, other_option, why):
    """Refuse an output that would overwrite or append to an input."""
    if other_path and "://" not in str(other_path) and os.path.realpath(path) == os.path.realpath(other_path):
        raise click.BadParameter(f"{path} is also the {other_option} {why}; give another file", param_hint=option)


def feature_size(detector, images, device, option):
    """Features per image of this detector, from the first image: found before all images are read."""
    try:
        return compute_features(detector, images[0][None], device).shape[1]
    except ImageSourceError as e:
        raise click.BadParameter(one_line(e), param_hint=option) from None
    except ValueError as e:
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
    fn = click.option("--device", default=None, metavar="DEVICE",
                      help="Where the detector runs: cpu, cuda or cuda:N; under torchrun each rank uses "
                           "cuda:LOCAL_RANK for cuda.  "
                           "[default: cuda if this machine has it, else cpu]")(fn)
    fn = click.option("--cache", default="./src", show_default=True, metavar="DIR",
                      help="Download cache root; the detector and reference URLs go to DIR/metrics/.")(fn)
    fn = click.option("--workers", type=click.IntRange(min=0), default=None, metavar="INT",
                      help="Image-decoding worker processes per rank (0 = decode in the main process).  "
                           f"[default: min(3, CPU cores available - 1), here {default_workers()}]")(fn)
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
def calc(images_path, ref_path, num, seed, results_path, label, detector, batch, workers, cache, device):
    """Calculate the FID of a set of images against reference statistics."""
    device = cli.check_device(device)
    workers = default_workers() if workers is None else workers
    if label is not None and results_path is None:
        raise click.BadParameter("only the --results line carries a label; add --results=FILE or drop --label",
                                 param_hint="--label")
    if results_path is not None:
        cli.check_output_file(results_path, "--results")
        check_not_same_file(results_path, "--results", ref_path, "--ref", "file, which a line would be appended to")
        check_not_same_file(results_path, "--results", images_path, "--images", "zip, which a line would be appended to")
    ref_is_url = "://" in ref_path
    if ref_is_url:
        check_download_cache(ref_path, cache)
    else:
        cli.check_input_file(ref_path, "--ref")
        ref_mu, ref_sigma = read_ref(ref_path, cache)  # the whole file is checked before any image is read
    check_detector(detector, cache)
    images = open_images(images_path, "--images", num=num, seed=seed)
    device = dist.init(device)
    if ref_is_url:
        ref_mu, ref_sigma = read_ref(ref_path, cache)
    dist.print0(f"Loading detector {detector or 'Inception-v3 (NVIDIA)'}...")
    det = get_detector(detector, device, cache)
    dim = feature_size(det, images, device, "--images")
    if dim != ref_mu.shape[0]:
        raise click.BadParameter(f"{ref_path} holds statistics of {ref_mu.shape[0]} features but the detector gives "
                                 f"{dim}; were both computed with the same feature detector?", param_hint="--ref")
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
            os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
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
def ref(data_path, dest_path, detector, batch, workers, cache, device):
    """Calculate reference statistics (mu, sigma) of a dataset for 'calc'."""
    device = cli.check_device(device)
    workers = default_workers() if workers is None else workers
    cli.check_output_file(dest_path, "--dest")
    check_not_same_file(dest_path, "--dest", data_path, "--data", "zip, which would be overwritten")
    check_detector(detector, cache)
    images = open_images(data_path, "--data")
    device = dist.init(device)
    dist.print0(f"Loading detector {detector or 'Inception-v3 (NVIDIA)'}...")
    det = get_detector(detector, device, cache)
    feature_size(det, images, device, "--data")  # a detector that cannot take these images fails here
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

"""Throughput of FID feature extraction: img/s of `metrics.detectors.compute_features` with Inception-v3.

The detector is NVIDIA's `inception-2015-12-05.pkl` when it is already in the cache (never downloaded
here), else `metrics.inception_arch.InceptionV3` with random weights: the same architecture, so the same
work per image. Images are random uint8 NCHW batches on the host, as fid.py reads them from disk;
compute_features moves them to the device, the detector resizes them to 299x299. Warm-up batches are not
measured; the clock stops once the device is idle.

Examples:

\b
python benchmarks/bench_fid.py --batch=256 --batches=20
python benchmarks/bench_fid.py --batch=256 --channels_last
python benchmarks/bench_fid.py --tiny --device=cpu
"""

import os
import sys
import time

import click
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

REAL_DETECTOR = "inception-2015-12-05.pkl"


def get_detector(spec, cache_root, device):
    """(detector, description): an explicit --detector, the cached NVIDIA file, or random weights."""
    from metrics.detectors import load_detector
    from metrics.inception_arch import InceptionV3

    if spec == "random":
        return InceptionV3().to(device), "random-weight InceptionV3 (metrics.inception_arch)"
    if spec is None:
        cached = os.path.join(cache_root, "metrics", REAL_DETECTOR)
        if not os.path.isfile(cached):
            return InceptionV3().to(device), f"random-weight InceptionV3 (metrics.inception_arch; no {cached})"
        spec = None  # load_detector's default finds it in the cache without downloading
    return load_detector(spec, device=device, cache_root=cache_root), f"{spec or REAL_DETECTOR} (real weights)"


def measure(*, tiny, batch, batches, warmup, res, channels, detector, channels_last, cudnn_benchmark, cache_root,
            device):
    from metrics.detectors import compute_features
    from metrics.inception_arch import InceptionV3

    if tiny:  # the real architecture, few images
        batch, batches, warmup = min(batch, 2), 1, min(warmup, 1)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    det, description = get_detector(detector, cache_root, device)
    if channels_last:
        if not isinstance(det, InceptionV3):
            raise click.BadParameter("only the built-in InceptionV3 can be converted", param_hint="--channels_last")
        det = det.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, 256, [batch, channels, res, res], dtype=torch.uint8, generator=gen) for _ in range(2)]

    flops = None
    if isinstance(det, InceptionV3):
        one = pool[0][:1].expand(1, 3, res, res)
        flops = common.forward_flops(lambda: det(one.to(device), return_features=True), batch=1)

    watch = common.Stopwatch(device)
    for k in range(warmup):
        compute_features(det, pool[k % 2], device)
    watch.sync()
    start = time.perf_counter()
    for k in range(batches):
        features = compute_features(det, pool[k % 2], device)
    watch.sync()
    seconds = time.perf_counter() - start
    rate = batches * batch / seconds
    result = dict(
        bench="fid", env=common.environment(device),
        settings=dict(detector=description, batch=batch, batches=batches, warmup_batches=warmup,
                      image=f"{channels}x{res}x{res} uint8 on host", resized_to=299, channels_last=channels_last,
                      cudnn_benchmark=cudnn_benchmark, tiny=tiny),
        img_per_s=rate, feature_dim=int(features.shape[1]), features_finite=bool(torch.isfinite(features).all()),
        flops_per_image=flops, tflops=(flops * rate / 1e12) if flops else None,
        peak_mem_gb=common.peak_memory_gb(device),
    )
    result["summary"] = [f"{rate:.1f} img/s ({batches} batches of {batch}, {seconds:.3f} s), features "
                         f"[{batch}, {result['feature_dim']}]"
                         + (f", {flops / 1e9:.2f} GFLOP/image -> {result['tflops']:.3g} TFLOP/s" if flops else "")]
    return result


@click.command(help=__doc__)
@click.option("--tiny", is_flag=True,
              help="CPU smoke run: one measured batch of at most 2 images, at most 1 warm-up batch")
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch")
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True, help="Measured batches")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Unmeasured batches")
@click.option("--res", type=click.IntRange(min=8), default=32, show_default=True, help="Input image side (cifar10: 32)")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True,
              help="Input channels (1 = grayscale, repeated to RGB as fid.py does)")
@click.option("--detector", default=None, metavar="PATH|random",
              help="Detector file, or 'random'  [default: the cached NVIDIA pickle if present, else random weights]")
@click.option("--channels_last", is_flag=True, help="Convert the built-in InceptionV3 to channels_last")
@click.option("--cudnn_benchmark", is_flag=True, help="torch.backends.cudnn.benchmark (fid.py leaves it off)")
@click.option("--cache", "cache_root", default="./src", show_default=True, help="Cache folder of fid.py")
@click.option("--device", default=None, help="Device  [default: cuda if available]")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also append the JSON line to FILE")
def main(device, json_path, channels, **opts):
    result = measure(device=common.pick_device(device), channels=int(channels), **opts)
    common.report(result, json_path)


if __name__ == "__main__":
    main()

"""Throughput of NFE-2 sampling (Euler, num_steps=4, AFS) as sample.py does it, PNG writing on and off.

Each batch goes through `sample.generate` (per-seed generators, the solver library) and `sample.to_uint8`;
with PNGs on, images are copied to the host and written by `sample.save_png` on a 4-thread pool while the
next batch is generated, one folder per 1000 seeds, as sample.py does. Warm-up batches are not measured;
the clock stops once the device is idle and every PNG is on disk. The network has random weights (the
cifar10 architecture, or `--tiny`), so PNG encoding works on the images such a network makes.

Examples:

\b
python benchmarks/bench_sample.py --batch=256 --batches=20
python benchmarks/bench_sample.py --batch=256 --precision=fp16 --png=off
python benchmarks/bench_sample.py --batch=256 --precision=bf16 --channels_last --compile=reduce-overhead --png=off
python benchmarks/bench_sample.py --tiny --device=cpu --batch=4 --batches=2 --warmup=1
"""

import concurrent.futures
import os
import sys
import tempfile
import time

import click
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from training.precision import PRECISIONS  # noqa: E402

PNG_THREADS = 4  # sample.py's pool


def sampling_config(net, num_steps, afs):
    import dnnlib

    return dnnlib.EasyDict(solver="euler", num_steps=num_steps, afs=afs, schedule_type="polynomial", schedule_rho=7.0,
                           sigma_min=net.sigma_min, sigma_max=net.sigma_max, step_condition=None, options={},
                           guidance_rate=None)


def run_batches(net, cfg, device, batch, first_seed, num_batches, outdir=None, pool=None):
    """Generate num_batches batches (writing PNGs when outdir is given); returns the seconds taken."""
    from sample import generate, save_png, to_uint8

    watch = common.Stopwatch(device)
    pending = []
    watch.sync()
    start = time.perf_counter()
    for b in range(num_batches):
        seeds = list(range(first_seed + b * batch, first_seed + (b + 1) * batch))
        with torch.no_grad():
            images = to_uint8(generate(net, cfg, seeds, device))
        if outdir is None:
            continue
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        for seed, arr in zip(seeds, arrays):
            folder = os.path.join(outdir, f"{seed - seed % 1000:06d}")
            os.makedirs(folder, exist_ok=True)
            pending.append(pool.submit(save_png, arr, os.path.join(folder, f"{seed:06d}.png")))
    for p in pending:
        p.result()
    watch.sync()
    return time.perf_counter() - start


def latents_seconds(net, device, batch, num_batches):
    """Time of the per-seed latent draws alone (sample.SeedGenerators), per batch."""
    from sample import SeedGenerators

    watch = common.Stopwatch(device)
    shape = [batch, net.img_channels, net.img_resolution, net.img_resolution]
    watch.sync()
    start = time.perf_counter()
    for b in range(num_batches):
        SeedGenerators(device, range(b * batch, (b + 1) * batch)).randn(shape, device=device)
    watch.sync()
    return (time.perf_counter() - start) / num_batches


def measure(*, tiny, batch, batches, warmup, num_steps, afs, png, cudnn_benchmark, device, precision="fp32",
            channels_last=False, compile=None):
    """`precision`/`channels_last`/`compile` are sample.py's switches."""
    import solvers
    from training.precision import RunMode, maybe_compile, prepare_module

    torch.backends.cudnn.benchmark = cudnn_benchmark
    net = common.build_edm(tiny).to(device)
    run_mode = RunMode(precision, device, [net])
    cfg = sampling_config(net, num_steps, afs)
    nfe = solvers.nfe_of("euler", num_steps, afs)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    flops_fwd = common.forward_flops(lambda: net(x, torch.full([2], 1.0, device=device)), batch=2)
    modes = {"both": ["off", "on"], "on": ["on"], "off": ["off"]}[png]
    result = dict(bench="sample", env=common.environment(device),
                  settings=dict(network="tiny" if tiny else "cifar10", params=common.num_params(net), batch=batch,
                                batches=batches, warmup_batches=warmup, solver="euler", num_steps=num_steps, afs=afs,
                                nfe=nfe, precision=run_mode.precision, channels_last=channels_last,
                                compile=compile or False, cudnn_benchmark=cudnn_benchmark, png_threads=PNG_THREADS))
    prepare_module(net, channels_last=channels_last)
    net_fn = maybe_compile(net, compile)
    summary = []
    seed = 0
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(max_workers=PNG_THREADS) as pool:
        for mode in modes:
            outdir = os.path.join(tmp, f"png-{mode}") if mode == "on" else None
            with run_mode.autocast():
                # warm-up (compilation, cuDNN, allocator, threads), then the measured batches
                run_batches(net_fn, cfg, device, batch, seed, warmup, outdir, pool)
                seed += warmup * batch
                seconds = run_batches(net_fn, cfg, device, batch, seed, batches, outdir, pool)
            seed += batches * batch
            rate = batches * batch / seconds
            result[f"img_per_s_png_{mode}"] = rate
            result[f"tflops_png_{mode}"] = flops_fwd * nfe * rate / 1e12
            summary.append(f"PNG {mode:3s}: {rate:.1f} img/s ({batches} batches of {batch}, {seconds:.3f} s) = "
                           f"{result[f'tflops_png_{mode}']:.4g} TFLOP/s at {nfe} x {flops_fwd / 1e9:.4g} GFLOP "
                           f"per image")
            if mode == "on":
                written = sum(len(files) for _, _, files in os.walk(outdir))
                result["pngs_written"] = written
                result["png_bytes_per_image"] = sum(
                    os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(outdir) for f in fs) / written
        result["latents_ms_per_batch"] = 1000 * latents_seconds(net, device, batch, max(1, min(batches, 4)))
    summary.append(f"per-seed latent draws alone: {result['latents_ms_per_batch']:.2f} ms per batch")
    result["flops_per_forward"] = flops_fwd
    result["peak_mem_gb"] = common.peak_memory_gb(device)
    result["summary"] = summary
    return result


@click.command(help=__doc__)
@click.option("--tiny", is_flag=True, help="A very small SongUNet instead of the cifar10 architecture (CPU runs)")
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch")
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True, help="Measured batches per mode")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Unmeasured batches per mode")
@click.option("--num_steps", type=click.IntRange(min=2), default=4, show_default=True, help="Time points")
@click.option("--afs/--no-afs", default=True, show_default=True, help="Analytical first step")
@click.option("--png", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Measure with PNG writing on, off, or both")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="sample.py's --precision (mixed precision on CUDA only)")
@click.option("--channels_last", is_flag=True, help="sample.py's --channels_last")
@click.option("--compile", default=None, metavar="MODE",
              help="torch.compile the network: default, reduce-overhead (CUDA graphs), max-autotune, or a backend")
@click.option("--cudnn_benchmark", is_flag=True, help="torch.backends.cudnn.benchmark (sample.py leaves it off)")
@click.option("--fast", is_flag=True,
              help="The fast path (benchmarks/common.py FAST_SAMPLE: " + ", ".join(common.as_pairs(common.FAST_SAMPLE))
              + "); --precision/--channels_last/--compile given on the command line override it")
@click.option("--device", default=None, help="Device  [default: cuda if available]")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also append the JSON line to FILE")
@click.pass_context
def main(ctx, device, json_path, fast, **opts):
    if fast:
        for name, value in common.FAST_SAMPLE.items():
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.COMMANDLINE:
                opts[name] = value
    result = measure(device=common.pick_device(device), **opts)
    result["settings"]["fast"] = fast
    common.report(result, json_path)


if __name__ == "__main__":
    main()

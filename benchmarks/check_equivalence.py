"""Does the fast path compute what the fp32 path computes? Per-step losses and sampled images, side by side.

Trains the same student three times from the same seed and the same teacher (the cifar10 architecture with
random weights — its near-zero initialised layers re-drawn so that every layer matters — or `--tiny` on a
CPU), one tick per iteration so that stats.jsonl holds every iteration's
per-step losses:
  fp32  the plain path (the reference),
  fp16  the paper's mixed precision (EDM's use_fp16; CUDA only, as in EDM, so on a CPU it equals fp32) — its
        distance to fp32 is "the noise of mixed precision",
  fast  the fast path under test (default: bf16 autocast + channels-last + torch.compile).
It prints, per run against fp32, the relative difference |a − b| / |b| of every (iteration, student step) loss —
median, 90th percentile and max — and the first iteration's (the same weights, so only arithmetic differs).
Then each trained student samples the same seeds with its own 2-NFE Euler sampler in fp32, and the fp32-trained
student also samples with the fast sampling path (sample.py's --precision/--channels_last/--compile); the
images are compared as uint8 PNG pixels by mean PSNR.

Examples:

\b
# GPU (issue 8): 2 kimg at batch 128
python benchmarks/check_equivalence.py --batch=128 --kimg=2
\b
# CPU smoke run
python benchmarks/check_equivalence.py --tiny --device=cpu --batch=8 --kimg=0.032 --fast precision=fp32 \
    --fast channels_last=true --sample_fast precision=fp32
"""

import contextlib
import math
import os
import statistics
import sys
import tempfile

import click
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_train import parse_loop_kwargs, read_ticks  # noqa: E402

DEFAULT_FAST = common.as_pairs(common.FAST_TRAIN)
DEFAULT_SAMPLE_FAST = common.as_pairs(common.FAST_SAMPLE)


def train(model_path, tmp, name, batch, kimg, device, seed, loop_kwargs):
    """One distillation run; returns (per-iteration loss dicts, trained student, snapshot settings)."""
    from training.training_loop import training_loop

    iters = max(1, math.ceil(kimg * 1000 / batch - 1e-9))
    run_dir = os.path.join(tmp, name)
    os.makedirs(run_dir)
    with contextlib.redirect_stdout(sys.stderr):
        res = training_loop(run_dir=run_dir, model_path=model_path, batch_size=batch,
                            total_kimg=(iters * batch - 0.5) / 1000, kimg_per_tick=(batch - 0.5) / 1000, seed=seed,
                            lpips=False, device=device, progress=False, **loop_kwargs)
    losses = [tick["loss"] for tick in read_ticks(run_dir)]
    if len(losses) != iters:
        raise RuntimeError(f"{name}: expected {iters} ticks (one per iteration), got {len(losses)}")
    net = res.net
    if hasattr(net, "use_fp16"):
        net.use_fp16 = False  # sample in fp32 unless a sampling path says otherwise
    return losses, net.to(memory_format=torch.contiguous_format), res.settings


def relative_differences(losses, reference):
    """|a − b| / |b| for every (iteration, step) loss, in iteration order."""
    out = []
    for a, b in zip(losses, reference):
        for step in b:
            out.append(abs(a[step] - b[step]) / max(abs(b[step]), 1e-30))
    return out


def summarize(diffs, first):
    q = sorted(diffs)
    return dict(median=statistics.median(q), p90=q[min(len(q) - 1, int(0.9 * len(q)))], max=q[-1],
                first_iteration_max=max(first))


@torch.no_grad()
def sample_uint8(net, settings, seeds, device, sample_opts=None):
    """Images of the student's own sampler (Euler, its num_steps and AFS) for `seeds`, as uint8."""
    import solvers
    from sample import SeedGenerators, to_uint8
    from training.precision import RunMode, maybe_compile, prepare_module

    opts = {**dict(precision="fp32", channels_last=False, compile=False), **(sample_opts or {})}
    mode = RunMode(opts["precision"], device, [net])
    prepare_module(net, channels_last=opts["channels_last"])
    fn = maybe_compile(net, opts["compile"])
    shape = [len(seeds), net.img_channels, net.img_resolution, net.img_resolution]
    latents = SeedGenerators(device, seeds).randn(shape, device=device)
    step_condition = settings["num_steps"] if settings.get("use_step_condition") else None
    with mode.autocast():
        x = solvers.euler_sampler(fn, latents, num_steps=settings["num_steps"], afs=settings["afs"],
                                  sigma_min=settings["sigma_min"], sigma_max=settings["sigma_max"],
                                  schedule_type=settings["schedule_type"], schedule_rho=settings["schedule_rho"],
                                  step_condition=step_condition)
    if hasattr(net, "use_fp16"):
        net.use_fp16 = False
    net.to(memory_format=torch.contiguous_format)
    return to_uint8(x.float()).cpu()


@torch.no_grad()
def wake_zero_layers(net, seed):
    """Re-draw the near-zero initialised layers (EDM's output and residual convolutions) as N(0, 1/fan_in), so that
    a random-weight teacher's output depends on every layer and mixed-precision rounding shows in the losses."""
    gen = torch.Generator().manual_seed(seed + 1)
    for p in net.parameters():
        if p.dim() >= 2 and p.abs().max() < 1e-3:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return net


def measure(tiny, batch, kimg, seeds, device, seed, fast, sample_fast, paper_fp16=True):
    from metrics.images import psnr_uint8
    from torch_utils.persistence import save_edm_pickle

    teacher = wake_zero_layers(common.build_edm(tiny, seed=seed), seed)
    runs = dict(fp32=dict(precision="fp32"), fast=fast)
    if paper_fp16:
        runs["fp16"] = dict(precision="fp16")
    losses, nets, settings = {}, {}, None
    with tempfile.TemporaryDirectory(prefix="equivalence-") as tmp:
        model_path = os.path.join(tmp, "teacher.pkl")
        save_edm_pickle(model_path, {"ema": teacher})
        for name, kwargs in runs.items():
            # Mixed precision armed on a CPU too, so that the CPU smoke run exercises the same switches.
            loop = dict(kwargs, mixed_on_cpu=device.type != "cuda")
            losses[name], nets[name], settings = train(model_path, tmp, name, batch, kimg, device, seed, loop)
    seed_list = list(range(seeds))
    images = {name: sample_uint8(net, settings, seed_list, device) for name, net in nets.items()}
    images["fp32_trained_fast_sampled"] = sample_uint8(nets["fp32"], settings, seed_list, device, sample_fast)

    result = dict(bench="equivalence", env=common.environment(device),
                  settings=dict(network="tiny" if tiny else "cifar10", batch=batch, kimg=kimg, seeds=seeds,
                                iterations=len(losses["fp32"]), fast=fast, sample_fast=sample_fast,
                                steps_per_iteration=len(losses["fp32"][0])),
                  loss_rel_diff={}, psnr_db={})
    summary = []
    for name in runs:
        if name == "fp32":
            continue
        diffs = relative_differences(losses[name], losses["fp32"])
        first = relative_differences(losses[name][:1], losses["fp32"][:1])
        stats = summarize(diffs, first)
        result["loss_rel_diff"][name] = stats
        summary.append(f"losses {name} vs fp32 over {len(diffs)} (iteration, step) pairs: relative difference "
                       f"median {stats['median']:.2e}, p90 {stats['p90']:.2e}, max {stats['max']:.2e}; "
                       f"first iteration max {stats['first_iteration_max']:.2e}")
        result["psnr_db"][f"{name}_trained"] = psnr_uint8(images[name], images["fp32"])
    result["psnr_db"]["fast_sampling"] = psnr_uint8(images["fp32_trained_fast_sampled"], images["fp32"])
    for key, value in result["psnr_db"].items():
        summary.append(f"PSNR {key} vs fp32 (uint8 images of {seeds} seeds, 2-NFE Euler): {value:.2f} dB")
    result["losses"] = losses
    result["summary"] = summary
    return result


@click.command(help=__doc__)
@click.option("--tiny", is_flag=True, help="A very small SongUNet instead of the cifar10 architecture (CPU runs)")
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--kimg", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Trajectories per run (rounded up to whole iterations)")
@click.option("--seeds", type=click.IntRange(min=1), default=256, show_default=True, help="Images compared by PSNR")
@click.option("--fast", multiple=True, metavar="NAME=VALUE",
              help=f"training_loop keyword of the fast path (VALUE as JSON); repeatable  [default: {' '.join(DEFAULT_FAST)}]")
@click.option("--sample_fast", multiple=True, metavar="NAME=VALUE",
              help=f"Fast sampling path: precision / channels_last / compile  [default: {' '.join(DEFAULT_SAMPLE_FAST)}]")
@click.option("--no-paper-fp16", "no_fp16", is_flag=True, help="Skip the fp16 (paper) run")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="Device  [default: cuda if available]")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also append the JSON line to FILE")
def main(tiny, batch, kimg, seeds, fast, sample_fast, no_fp16, seed, device, json_path):
    from training.training_loop import training_loop

    fast_kwargs = parse_loop_kwargs(fast or DEFAULT_FAST, training_loop)
    sample_kwargs = parse_loop_kwargs(sample_fast or DEFAULT_SAMPLE_FAST, training_loop)
    unknown = set(sample_kwargs) - {"precision", "channels_last", "compile"}
    if unknown:
        raise click.BadParameter(f"only precision, channels_last and compile apply to sampling, got {sorted(unknown)}",
                                 param_hint="--sample_fast")
    device = common.pick_device(device)
    result = measure(tiny, batch, kimg, seeds, device, seed, fast_kwargs, sample_kwargs, paper_fp16=not no_fp16)
    common.report(result, json_path)


if __name__ == "__main__":
    main()

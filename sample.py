"""Generate images with a distilled SFD model (or a pre-trained teacher and any solver of the library).

Examples:

\b
# 50k images from the latest snapshot of experiment 0, 4 GPUs
torchrun --standalone --nproc_per_node=4 sample.py --dataset_name=cifar10 --model_path=0 --seeds=0-49999 --batch=256

\b
# SFD-v: pick the number of time points (4..7)
python sample.py --dataset_name=cifar10 --model_path=0 --seeds=0-49999 --batch=256 --num_steps=5

\b
# Baseline: the pre-trained teacher with DPM-Solver++(3M), 5 NFE with AFS
python sample.py --dataset_name=cifar10 --solver=dpmpp --num_steps=7 --afs=True --seeds=0-49999

\b
# FID in-process, no PNGs written
python sample.py --model_path=0 --seeds=0-9999 --fid_ref=path/to/ref.npz --no-save
"""

import collections
import concurrent.futures
import os
import pickle
import re

import click
import numpy as np
import PIL.Image
import torch
from click.core import ParameterSource

import dnnlib
import solvers
from torch_utils import distributed as dist
from torch_utils import cli
from models.snapshot import SFDV_NUM_STEPS, is_sfdv
from torch_utils.run_folders import latest_snapshot, latest_snapshot_in  # noqa: F401  (experiments use it)
from torch_utils.cli import CommandError
from training.precision import PRECISIONS, RunMode, maybe_compile, prepare_module

SOLVER_OPTION_NAMES = tuple(solvers.TABLE["dpmpp"].options)  # the solver options sample.py exposes
DEFAULT_OUTDIR_ROOT = "./samples"


class SeedGenerators:
    """One torch.Generator per image, seeded by the image's seed: image k never depends on batching."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size, device):
        return torch.stack([torch.randn(size[1:], generator=g, device=device) for g in self.generators])

    def randint(self, high, device):
        return torch.stack([torch.randint(high, size=[], generator=g, device=device) for g in self.generators])


def to_uint8(images):
    """[-1, 1] float NCHW -> uint8 NCHW, rounding as EDM's and the paper's scripts do."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def save_png(array_hwc, path):
    """Atomic PNG write: a crash never leaves a truncated image behind."""
    mode = "L" if array_hwc.shape[2] == 1 else "RGB"
    with dnnlib.util.atomic_path(path) as tmp:
        PIL.Image.fromarray(array_hwc[:, :, 0] if mode == "L" else array_hwc, mode).save(tmp, format="PNG")


def image_grid(images_uint8):
    """[N, C, H, W] uint8 -> one HWC grid about as wide as tall."""
    n, c, h, w = images_uint8.shape
    cols = max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / cols))
    grid = np.zeros([rows * h, cols * w, c], dtype=np.uint8)
    arr = images_uint8.permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = arr[k]
    return grid


def check_sampling_options(opts):
    """One-line errors for solver options that are wrong whatever the model (before anything is loaded)."""
    solver = opts.solver or "euler"
    if solvers.TABLE[solver].order_range is not None:  # other solvers' max_order: check_solver_options below
        try:
            solvers.TABLE[solver].check_max_order(opts.max_order, optional=True)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--max_order") from None
    for name in ("sigma_min", "sigma_max"):
        if opts[name] is not None and not opts[name] > 0:
            raise click.BadParameter(f"must be > 0, got {opts[name]}", param_hint=f"--{name}")
    if opts.sigma_min is not None and opts.sigma_max is not None and not opts.sigma_min < opts.sigma_max:
        raise click.BadParameter(f"{opts.sigma_min} is not below --sigma_max={opts.sigma_max}",
                                 param_hint="--sigma_min")
    if opts.schedule_rho is not None and opts.schedule_type != "logsnr" and not opts.schedule_rho > 0:
        raise click.BadParameter(f"must be > 0, got {opts.schedule_rho}", param_hint="--schedule_rho")
    if opts.schedule_rho is not None and opts.schedule_type == "logsnr":
        raise click.BadParameter("the logsnr schedule has no exponent; drop --schedule_rho or pick another "
                                 "--schedule_type", param_hint="--schedule_rho")
    if opts.afs and opts.num_steps == 2 and not opts.denoise_to_zero:
        raise click.BadParameter("num_steps=2 with --afs leaves no network call (NFE 0); use --num_steps >= 3 or "
                                 "drop --afs", param_hint="--num_steps")
    if opts.solver is not None:  # without --solver the model decides (a distilled snapshot refuses them all)
        check_solver_options(opts.solver, opts)


def check_solver_options(solver, opts, default=False):
    """A solver option of another solver would be ignored: refused, naming the solvers that have it."""
    for name in SOLVER_OPTION_NAMES:
        if opts[name] is not None and name not in solvers.TABLE[solver].options:
            owners = " or ".join(f"--solver={s}" for s in sorted(solvers.TABLE) if name in solvers.TABLE[s].options)
            which = f"the default solver, {solver}," if default else f"--solver={solver}"
            raise click.BadParameter(f"{which} has no {name}; it applies to {owners}", param_hint=f"--{name}")


def check_seeds(seeds):
    """Every seed is one image and one file: a seed listed twice would be sampled twice and written once, and a seed
    from 2^32 on would draw the image of a smaller one (generators take seeds mod 2^32, as EDM does)."""
    too_big = [s for s in seeds if s >= 1 << 32]
    if too_big:
        raise click.BadParameter(f"{too_big[0]} is too large; seeds run from 0 to {(1 << 32) - 1}",
                                 param_hint="--seeds")
    counts = collections.Counter(seeds)
    repeated = [(s, n) for s, n in counts.items() if n > 1]
    if repeated:
        said = ", ".join(f"{s} {'twice' if n == 2 else f'{n} times'}" for s, n in repeated[:3])
        extra = len(repeated) - 3
        more = f" and {extra} more repeated seed{'s' if extra > 1 else ''}" if extra > 0 else ""
        raise click.BadParameter(f"lists {said}{more}; each seed is one image, list it once", param_hint="--seeds")


def _given(name):
    """Whether option `name` was given on the command line (not left at its default)."""
    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is not None and source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _is_url(spec):
    return "://" in str(spec)


def check_command_line(grid, save_images, outdir, opts):
    """One-line errors for options that contradict each other and for paths that cannot be used, all before the
    network is loaded; nothing is created."""
    if not save_images:
        if not opts.fid_ref:
            raise click.BadParameter("--no-save without --fid_ref would produce nothing", param_hint="--save")
        for name, given in (("grid", grid), ("subdirs", _given("subdirs")), ("outdir", outdir is not None)):
            if given:
                raise click.BadParameter(f"--no-save writes no images; drop --{name}", param_hint=f"--{name}")
    if grid and _given("subdirs"):
        raise click.BadParameter("--grid writes one grid.png, not one PNG per seed; drop --subdirs",
                                 param_hint="--subdirs")
    if opts.detector is not None and not opts.fid_ref:
        raise click.BadParameter("the detector is used only for --fid_ref; add --fid_ref or drop --detector",
                                 param_hint="--detector")
    if opts.prompt is not None and opts.captions is not None:
        raise click.BadParameter("--prompt gives every seed the same prompt, so the caption file would go unused; "
                                 "drop one of them", param_hint="--captions")
    if opts.captions is not None:
        cli.check_input_file(opts.captions, "--captions")
    if opts.fid_ref and not _is_url(opts.fid_ref):
        cli.check_input_file(opts.fid_ref, "--fid_ref")
    if opts.detector is not None:
        from metrics.detectors import detector_format

        if not _is_url(opts.detector):
            cli.check_input_file(opts.detector, "--detector")
        try:
            detector_format(opts.detector)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--detector") from None
    if save_images:
        # The default folder is named once the model is known; its root is checked now, the whole path later.
        cli.check_output_dir(outdir if outdir is not None else DEFAULT_OUTDIR_ROOT, "--outdir")


def check_model_takes(net, opts):
    """Options that only some models use (text prompts, caption files), refused for a model that would ignore them
    (known once the network is loaded, before anything is sampled)."""
    if opts.prompt is not None and not hasattr(net, "encode_prompts"):
        raise click.BadParameter("this model takes no text (Stable Diffusion, --dataset_name=ms_coco, does); drop "
                                 "--prompt", param_hint="--prompt")
    if opts.captions is not None and not hasattr(net, "captions_for_seeds"):
        raise click.BadParameter("this model takes no captions (Stable Diffusion, --dataset_name=ms_coco, does); "
                                 "drop --captions", param_hint="--captions")


def check_captions_cover(net, seeds, prompt):
    """A text model without --prompt samples the caption of row `seed`: every seed needs a row (checked, and the
    caption file read, before sampling)."""
    if prompt is not None or not hasattr(net, "captions_for_seeds"):
        return
    try:
        net.captions_for_seeds([min(seeds), max(seeds)])
    except (ValueError, OSError, dnnlib.DownloadError) as e:
        raise CommandError(e) from None


def record_captions(net, seeds, prompt, outdir):
    """A text model's images: the caption each seed is sampled with goes beside them ({outdir}/captions.csv, merged
    with an earlier run's seeds), so that clip_score.py can check that it pairs every image with its own caption."""
    if not hasattr(net, "captions_for_seeds"):
        return
    from models.latent.text import SEED_CAPTIONS_FILE, record_seed_captions

    texts = [prompt] * len(seeds) if prompt is not None else net.captions_for_seeds(seeds)
    os.makedirs(outdir, exist_ok=True)
    try:
        record_seed_captions(os.path.join(outdir, SEED_CAPTIONS_FILE), dict(zip(seeds, texts)))
    except ValueError as e:  # an unreadable record left by an earlier run
        raise click.BadParameter(f"{e}; remove it or give another folder", param_hint="--outdir") from None


def guidance_note(settings, net):
    """A snapshot distilled with classifier-free guidance settings on a network that has none (possible with an
    EDM teacher): the images are sampled without guidance, and the run says so."""
    if settings.get("guidance_type") == "cfg" and getattr(net, "guidance_type", None) != "cfg":
        return (f"Note: the snapshot records classifier-free guidance (guidance_rate {settings.get('guidance_rate')}), "
                f"which this network cannot apply; sampling without guidance")
    return None


def default_outdir(loaded, model_path, cfg, nfe):
    """./samples/{what was sampled}/{solver}_step{N}_nfe{nfe}: the dataset's name when known, else the model file's
    name (e.g. samples/fmnist-teacher/... for assets/fmnist-teacher.pkl)."""
    name = loaded.dataset_name
    if not name and model_path is not None:
        name = os.path.splitext(os.path.basename(os.path.normpath(model_path)))[0]
    return os.path.join(DEFAULT_OUTDIR_ROOT, name or "model", f"{cfg.solver}_step{cfg.num_steps}_nfe{nfe}")


def check_schedule(cfg, net):
    """Build the run's schedule once before sampling, so that a schedule the model cannot follow (e.g. 'discrete'
    on an EDM model, or a --sigma_min above the model's sigma_max) fails in one line."""
    try:
        solvers.get_schedule(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, schedule_type=cfg.schedule_type,
                             schedule_rho=cfg.schedule_rho, net=net)
    except ValueError as e:
        hint = "--schedule_type" if cfg.schedule_type == "discrete" and "needs a net" in str(e) else (
            "--sigma_min/--sigma_max" if "sigma_min" in str(e) else "--schedule_type")
        raise click.BadParameter(str(e).splitlines()[0], param_hint=hint) from None


def resolve_sampling(loaded, opts):
    """Settings for this run: from the snapshot for distilled models, from the options for pre-trained ones."""
    st = loaded.settings
    distilled = "num_steps" in st and "afs" in st and "schedule_type" in st
    if distilled:
        given = [n for n in ("solver", "afs", "schedule_type", "schedule_rho", "sigma_min", "sigma_max",
                             *SOLVER_OPTION_NAMES) if opts[n] is not None]
        given += ["denoise_to_zero"] if opts.denoise_to_zero else []
        if given:
            raise click.BadParameter(f"a distilled snapshot carries its own sampling settings; drop --{given[0]}",
                                     param_hint=f"--{given[0]}")
        num_steps = st["num_steps"]
        step_condition = None
        if is_sfdv(st):
            lo, hi = st.get("step_condition_range", SFDV_NUM_STEPS)
            num_steps = opts.num_steps if opts.num_steps is not None else num_steps
            if not lo <= num_steps <= hi:
                raise click.BadParameter(f"this SFD-v model was trained for num_steps {lo}..{hi}, got {num_steps}",
                                         param_hint="--num_steps")
            step_condition = num_steps
        elif st.get("use_step_condition"):
            step_condition = num_steps
            if opts.num_steps is not None and opts.num_steps != num_steps:
                raise click.BadParameter(f"this second-stage model samples only at num_steps={num_steps}",
                                         param_hint="--num_steps")
        elif opts.num_steps is not None and opts.num_steps != num_steps:
            raise click.BadParameter(f"--num_steps is only honoured for SFD-v models; this model was distilled for "
                                     f"num_steps={num_steps}", param_hint="--num_steps")
        return dnnlib.EasyDict(
            solver="euler", num_steps=num_steps, afs=bool(st["afs"]), schedule_type=st["schedule_type"],
            schedule_rho=st["schedule_rho"], sigma_min=st["sigma_min"], sigma_max=st["sigma_max"],
            step_condition=step_condition, options={}, guidance_rate=st.get("guidance_rate"), denoise_to_zero=False)
    solver = opts.solver or "euler"
    check_solver_options(solver, opts, default=opts.solver is None)
    options = {k: opts[k] for k in solvers.TABLE[solver].options if k in SOLVER_OPTION_NAMES and opts[k] is not None}
    return dnnlib.EasyDict(
        solver=solver, num_steps=opts.num_steps or 18, afs=bool(opts.afs), schedule_type=opts.schedule_type or
        "polynomial", schedule_rho=opts.schedule_rho if opts.schedule_rho is not None else 7.0,
        sigma_min=opts.sigma_min if opts.sigma_min is not None else st["sigma_min"],
        sigma_max=opts.sigma_max if opts.sigma_max is not None else st["sigma_max"],
        step_condition=None, options=options, guidance_rate=None, denoise_to_zero=bool(opts.denoise_to_zero))


def generate(net, cfg, seeds, device, prompts=None):
    """Images in [-1, 1] (decoded if the backbone works in a latent space) for one batch of seeds."""
    rnd = SeedGenerators(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if getattr(net, "label_dim", 0):
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, device=device)]
    condition = unconditional = None
    if prompts is not None and hasattr(net, "encode_prompts"):
        condition, unconditional = net.encode_prompts(prompts)
    x = solvers.SOLVERS[cfg.solver](
        net, latents, class_labels=class_labels, condition=condition, unconditional_condition=unconditional,
        num_steps=cfg.num_steps, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, schedule_type=cfg.schedule_type,
        schedule_rho=cfg.schedule_rho, afs=cfg.afs, step_condition=cfg.step_condition,
        denoise_to_zero=cfg.get("denoise_to_zero", False), **cfg.options)
    if hasattr(net, "decode_latents"):
        x = net.decode_latents(x)
    return x


def _optional_bool(name, text, default=None):
    return click.option(name, help=text, type=bool, is_flag=False, flag_value=True, default=default,
                        metavar="[BOOL]")


@click.command(help=__doc__)
@click.option("--dataset_name", help="Backbone name; checked against the snapshot's", metavar="STR", type=str)
@click.option("--model_path", help="Snapshot path, experiment folder or number (its latest snapshot), or an "
              "EDM-format .pkl; omitted: the pre-trained model of --dataset_name", metavar="N|PATH", type=str)
@click.option("--exps_dir", help="Where experiment numbers are looked up", metavar="DIR", default="./exps",
              show_default=True)
@click.option("--seeds", help="Seeds, e.g. 0-49999 or 1,2,5-10 (one image per seed)", metavar="LIST",
              type=cli.parse_int_list, default="0-63", show_default=True)
@click.option("--batch", "max_batch_size", help="Maximum batch per process", metavar="INT",
              type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--num_steps", help="Time points; only for SFD-v models and pre-trained sampling  [default: the "
              "snapshot's / 18]", metavar="INT", type=click.IntRange(min=2), default=None)
@click.option("--outdir", help="Output folder  [default: ./samples/{dataset, else the model file's name}/"
              "{solver}_step{N}_nfe{nfe}]", metavar="DIR", type=str)
@_optional_bool("--grid", "Write one grid.png of all images instead of one PNG per seed  [default: False]", False)
@_optional_bool("--subdirs", "One sub-folder per 1000 seeds  [default: True]", True)
@click.option("--save/--no-save", "save_images", help="Write images (turn off with --fid_ref for FID only)",
              default=True, show_default=True)
@click.option("--prompt", help="Stable Diffusion: one prompt for every seed  [default: caption of row=seed]",
              metavar="STR", type=str)
@click.option("--solver", help="Pre-trained models only: solver", type=click.Choice(sorted(solvers.SOLVERS)))
@_optional_bool("--afs", "Pre-trained models only: analytical first step  [default: False]")
@click.option("--max_order", help="Pre-trained models only: multistep order", metavar="INT", type=int)
@_optional_bool("--predict_x0", "Pre-trained models only: DPM-Solver++ data prediction")
@_optional_bool("--thresholding", "Pre-trained models only: DPM-Solver++ dynamic thresholding  [default: "
                f"{solvers.TABLE['dpmpp'].options['thresholding']}]")
@_optional_bool("--lower_order_final", "Pre-trained models only: DPM-Solver++ lower final orders")
@_optional_bool("--denoise_to_zero", "Pre-trained models only: one last network call from sigma_min to 0 (EDM's "
                "Heun 35 NFE = --num_steps 18 with this)  [default: False]", False)
@click.option("--schedule_type", help="Pre-trained models only: time schedule",
              type=click.Choice(solvers.SCHEDULE_TYPES))
@click.option("--schedule_rho", help="Pre-trained models only: schedule exponent", metavar="FLOAT", type=float)
@click.option("--sigma_min", help="Pre-trained models only  [default: the backbone's]", metavar="FLOAT", type=float)
@click.option("--sigma_max", help="Pre-trained models only  [default: the backbone's]", metavar="FLOAT", type=float)
@click.option("--captions", help="ms_coco: a local copy of the MS-COCO 30k caption CSV (row = seed) instead of the "
              "download", metavar="CSV", type=str, default=None)
@click.option("--fid_ref", help="Compute FID in-process against these statistics (NPZ or URL)", metavar="NPZ")
@click.option("--detector", help="Feature network for --fid_ref  [default: NVIDIA Inception-v3]", metavar="PATH")
@click.option("--precision", help="fp32 (as the paper samples), fp16 (EDM's use_fp16) or bf16 (autocast); mixed "
              "precision applies on CUDA only", type=click.Choice(PRECISIONS), default="fp32",
              show_default=True)
@_optional_bool("--channels_last", "Channels-last memory format  [default: False]", False)
@_optional_bool("--compile", "torch.compile the network (fixed batch shapes compile once)  [default: False]", False)
@click.option("--device", help="Device  [default: cuda if available]", metavar="STR", type=str)
def main(seeds, max_batch_size, grid, subdirs, save_images, outdir, **opts):
    opts = dnnlib.EasyDict(opts)
    device = dist.init(cli.check_device(opts.device))
    check_seeds(seeds)
    check_command_line(grid, save_images, outdir, opts)
    check_sampling_options(opts)

    model_path = opts.model_path
    if model_path is not None and re.fullmatch(r"\d+", model_path):
        model_path = latest_snapshot(model_path, opts.exps_dir)
    elif model_path is not None and os.path.isdir(model_path) and not os.path.isfile(
            os.path.join(model_path, "model_index.json")):  # a diffusers SD folder is a model, not an experiment
        model_path = latest_snapshot_in(model_path)
    elif model_path is not None and not os.path.isdir(model_path):
        cli.check_input_file(model_path, "--model_path")
    if model_path is None and opts.dataset_name is None:
        raise click.BadParameter("give --model_path or --dataset_name", param_hint="--model_path")
    from models import load_network

    try:
        loaded = dist.rank0_first(lambda: load_network(dataset_name=opts.dataset_name, model_path=model_path,
                                                       device=device))
    except (ValueError, pickle.UnpicklingError, dnnlib.DownloadError) as e:
        raise CommandError(e) from None
    net = loaded.net
    check_model_takes(net, opts)
    if opts.captions is not None:
        net.use_caption_file(opts.captions)
    cfg = resolve_sampling(loaded, opts)
    check_schedule(cfg, net)
    check_captions_cover(net, seeds, opts.prompt)
    if cfg.guidance_rate is not None and hasattr(net, "guidance_rate"):
        net.guidance_rate = cfg.guidance_rate
    nfe = solvers.nfe_of(cfg.solver, cfg.num_steps, cfg.afs, denoise_to_zero=cfg.denoise_to_zero, **cfg.options)
    if getattr(net, "guidance_type", None) == "cfg" and getattr(net, "guidance_rate", 1.0) != 1.0:
        nfe *= 2
    if outdir is None:
        outdir = default_outdir(loaded, model_path, cfg, nfe)
    if save_images:
        cli.check_output_dir(outdir, "--outdir")
    if save_images and not grid and dist.get_rank() == 0:
        record_captions(net, seeds, opts.prompt, outdir)
    mode = RunMode(opts.precision, device, [net])
    prepare_module(net, channels_last=opts.channels_last)
    net_fn = maybe_compile(net, opts.compile)
    dist.print0(f"Model: {model_path or loaded.dataset_name} | solver {cfg.solver}, num_steps {cfg.num_steps}, "
                f"NFE {nfe}, afs {cfg.afs}, schedule {cfg.schedule_type}" + (f" | images to {outdir}" if save_images
                                                                             else ""))
    note = guidance_note(loaded.settings, net)
    if note:
        dist.print0(note)

    fid = None
    if opts.fid_ref:
        from metrics.detectors import load_detector_rank0_first
        from metrics.frechet import StreamingFID, load_ref

        try:
            mu, sigma = load_ref(opts.fid_ref)
            fid = StreamingFID(load_detector_rank0_first(opts.detector, device=device), mu, sigma, device=device)
        except (ValueError, OSError, dnnlib.DownloadError) as e:
            raise CommandError(f"--fid_ref/--detector: {e}") from None

    # Shard seeds: contiguous batches dealt round-robin to ranks (every rank gets the same number of batches).
    world, rank = dist.get_world_size(), dist.get_rank()
    num_batches = ((len(seeds) - 1) // (max_batch_size * world) + 1) * world
    rank_batches = torch.as_tensor(seeds).tensor_split(num_batches)[rank::world]

    captions = None
    if hasattr(net, "captions_for_seeds"):
        captions = net.captions_for_seeds

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4) if (save_images and not grid) else None
    pending, grid_parts = [], []
    from tqdm import tqdm

    for batch_seeds in tqdm(rank_batches, unit="batch", disable=(rank != 0)):
        batch_seeds = batch_seeds.tolist()
        if not batch_seeds:
            continue
        prompts = None
        if captions is not None or opts.prompt is not None:
            prompts = [opts.prompt] * len(batch_seeds) if opts.prompt is not None else captions(batch_seeds)
        with torch.no_grad(), mode.autocast():
            images = to_uint8(generate(net_fn, cfg, batch_seeds, device, prompts=prompts).float())
        if fid is not None:
            fid.add_images(images)
        if not save_images:
            continue
        if grid:
            grid_parts.append((batch_seeds, images.cpu()))
            continue
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        for seed, arr in zip(batch_seeds, arrays):
            folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
            os.makedirs(folder, exist_ok=True)
            pending.append(pool.submit(save_png, arr, os.path.join(folder, f"{seed:06d}.png")))
    for p in pending:
        p.result()
    if pool is not None:
        pool.shutdown()

    if grid and save_images:
        parts = [grid_parts]
        if dist.is_distributed():
            parts = [None] * world
            torch.distributed.all_gather_object(parts, grid_parts)
        if rank == 0:
            by_seed = sorted(((s, img) for part in parts for seeds_, imgs in part for s, img in zip(seeds_, imgs)),
                             key=lambda t: t[0])
            os.makedirs(outdir, exist_ok=True)
            save_png(image_grid(torch.stack([img for _, img in by_seed])), os.path.join(outdir, "grid.png"))
    if fid is not None:
        value = fid.compute()
        dist.print0(f"FID: {value:g}")
    dist.barrier()
    dist.print0(f"Done: {len(seeds)} images" + (f" in {outdir}" if save_images else ""))
    dist.shutdown()


if __name__ == "__main__":
    cli.run(main)

"""Distil a pre-trained diffusion model with SFD (Simple and Fast Distillation).

Examples:

\b
# 2-NFE SFD on CIFAR-10 (EDM teacher), 4 GPUs
torchrun --standalone --nproc_per_node=4 train.py --dataset_name=cifar10 --total_kimg=200 --batch=128 \\
    --lr=5e-5 --num_steps=4 --M=3 --afs=True --sampler_tea=dpmpp --max_order=3 --predict_x0=True \\
    --lower_order_final=True --schedule_type=polynomial --schedule_rho=7 --use_step_condition=False \\
    --is_second_stage=False

\b
# SFD-v: one model for num_steps 4..7 (NFE 2..5 with AFS)
python train.py --dataset_name=cifar10 --use_step_condition=True

\b
# Second stage: 1 NFE from a first-stage snapshot
python train.py --dataset_name=cifar10 --is_second_stage=True --model_path=exps/00000-.../network-snapshot-000200.safetensors \\
    --num_steps=3 --M=2 --afs=True --lr=5e-4 --total_kimg=2000
"""

import glob
import json
import os
import pickle
import re

import click
import torch

import dnnlib
import solvers
from torch_utils import cli
from torch_utils.cli import CommandError
from torch_utils import distributed as dist
from torch_utils.threads import pick_cpu_threads
from models.snapshot import SFDV_NUM_STEPS
from training.config import OPTION_NAMES, DistillConfig, OptionError
from training.precision import PRECISIONS, precision_that_runs

D = DistillConfig  # its class attributes are the defaults of the options below: one default for train.py and the loop

def _dataset_names():
    from models import BACKBONES
    from models.loader import DIFFUSERS

    return sorted(BACKBONES) + [DIFFUSERS]


def schedule_tag(schedule_type, schedule_rho):
    """The schedule part of an experiment folder name, as the paper's code writes it."""
    return solvers.schedules.SCHEDULE_TAGS[schedule_type].format(rho=schedule_rho)


def distilled_nfe(num_steps, afs, guidance_type=None):
    """The student's network calls: Euler over num_steps points, doubled by classifier-free guidance."""
    return solvers.nfe_of("euler", num_steps, afs) * (2 if guidance_type == "cfg" else 1)


def run_name(opts):
    """Experiment folder name: dataset-num_steps-NFE-teacher solver-M-schedule[-afs][-desc]. The second stage's
    teacher is the first-stage model under Euler with its own schedule, read from the snapshot when it is ours."""
    name = opts.dataset_name or os.path.splitext(os.path.basename(os.path.normpath(opts.model_path)))[0]
    solver, schedule_type, schedule_rho = opts.sampler_tea, opts.schedule_type, opts.schedule_rho
    if opts.is_second_stage:
        solver = "euler"
        try:
            from models.snapshot import read_snapshot_metadata

            first = read_snapshot_metadata(opts.model_path)[1]
            schedule_type, schedule_rho = first["schedule_type"], first["schedule_rho"]
        except (ValueError, KeyError, OSError):
            pass  # a paper snapshot (.pkl) or an unreadable file: the loader reports the latter
    nfe = distilled_nfe(opts.num_steps, opts.afs, opts.guidance_type)
    desc = f"{name}-{opts.num_steps}-{nfe}-{solver}-{opts.M}-{schedule_tag(schedule_type, schedule_rho)}"
    if opts.afs:
        desc += "-afs"
    if opts.desc:
        desc += f"-{opts.desc}"
    return desc


def next_run_dir(outdir, desc):
    """`outdir/NNNNN-desc` with the next free five-digit number."""
    ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            m = re.match(r"^(\d+)", name)
            if m and os.path.isdir(os.path.join(outdir, name)):
                ids.append(int(m.group(1)))
    return os.path.join(outdir, f"{max(ids, default=-1) + 1:05d}-{desc}")


def check_options(opts, world_size):
    """Raise click.BadParameter for contradictory or out-of-range options (one line each): DistillConfig's checks,
    the batch geometry for world_size ranks, and a built-in backbone's guidance."""
    try:
        cfg = DistillConfig(**{key: opts[name] for name, key in option_keys().items()}, device=opts.device)
        cfg.batch_geometry(world_size)
    except OptionError as e:
        raise click.BadParameter(str(e), param_hint=flag_of(e.option)) from None
    from models import BACKBONES, NETWORK_CLASSES

    if opts.dataset_name in BACKBONES and not opts.is_second_stage:
        from training.teacher import check_guidance

        own = getattr(NETWORK_CLASSES[BACKBONES[opts.dataset_name].network_class], "guidance_type", None)
        try:
            check_guidance(own, opts.guidance_type, opts.dataset_name)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--guidance_type") from None


def option_keys():
    """train.py option name -> DistillConfig field, for the options that are fields."""
    names = (CONFIG_KEYS.get(p.name, p.name) for p in main.params)
    return {p.name: key for p, key in zip(main.params, names) if key in OPTION_NAMES and key != "device"}


def flag_of(field):
    """The command-line flag of a DistillConfig field."""
    name = next((name for name, key in option_keys().items() if key == field), field)
    param = next(p for p in main.params if p.name == name)
    return next(o for o in param.opts if o.startswith("--"))


def find_resume(resume, outdir):
    """(run folder, dump path) for `--resume` given as an experiment number or a dump file."""
    from training.state import latest_dump

    if re.fullmatch(r"\d+", resume):
        folders = sorted(glob.glob(os.path.join(outdir, f"{int(resume):05d}-*")))
        if not folders:
            raise click.BadParameter(f"no experiment folder {outdir}/{int(resume):05d}-*", param_hint="--resume")
        dump = latest_dump(folders[0])
        if dump is None:
            raise click.BadParameter(f"{folders[0]} has no training-state dump (train with --dump to make them)",
                                     param_hint="--resume")
        return folders[0], dump
    if not os.path.isfile(resume):
        raise click.BadParameter(f"no such file: {resume}", param_hint="--resume")
    return os.path.dirname(os.path.abspath(resume)), resume


def _bool(name, default, text):
    return click.option(name, help=f"{text}  [default: {default}]", metavar="BOOL", type=bool, default=default)


@click.command(help=__doc__)
@click.option("--dataset_name", help="Built-in backbone (see models/registry.py), or 'diffusers' for a pipeline folder; "
              "optional when --model_path is given",
              metavar="STR", type=str, default=None)
@click.option("--outdir", help="Where experiment folders go", metavar="DIR", type=str, default="./exps",
              show_default=True)
@click.option("--total_kimg", help="Training length in thousands of trajectories", metavar="KIMG",
              type=click.FloatRange(min=0, min_open=True), default=D.total_kimg, show_default=True)
@click.option("--batch", help="Total batch size (trajectories per iteration, all ranks)", metavar="INT",
              type=click.IntRange(min=1), default=D.batch_size, show_default=True)
@click.option("--batch-gpu", "batch_gpu", help="Per-rank batch per accumulation round  [default: batch/ranks]",
              metavar="INT", type=click.IntRange(min=1), default=None)
@click.option("--lr", help="Adam learning rate (÷10 after half of total_kimg)", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True), default=D.lr, show_default=True)
@click.option("--num_steps", help="Student time points (steps + 1); NFE = num_steps-2 with AFS, else num_steps-1",
              metavar="INT", type=int, default=D.num_steps, show_default=True)
@click.option("--M", "M", help="Teacher points inserted between neighbouring student points", metavar="INT",
              type=click.IntRange(min=0), default=D.M, show_default=True)
@_bool("--afs", D.afs, "Analytical first step: the student's first step calls no network")
@click.option("--sampler_tea", help="Teacher solver", type=click.Choice(sorted(solvers.TABLE)), default=D.sampler_tea,
              show_default=True)
@click.option("--max_order", help="Order of multistep teachers: 1..4 for ipndm, 1..3 for dpmpp  [default: 4 / 3]",
              metavar="INT", type=int, default=None)
@_bool("--predict_x0", D.predict_x0, "DPM-Solver++: data-prediction formulation")
@_bool("--lower_order_final", D.lower_order_final, "DPM-Solver++: lower the order on the final steps")
@_bool("--thresholding", D.thresholding, "DPM-Solver++ teacher: dynamic thresholding of its data predictions. Off "
       "by default, as the paper's GPU runs effectively had it (their fp16 teacher made torch.quantile fail and the "
       "paper's code then skipped it); True applies it, as the paper's code does in fp32")
@click.option("--schedule_type", help="Time discretisation", type=click.Choice(solvers.SCHEDULE_TYPES),
              default=D.schedule_type, show_default=True)
@click.option("--schedule_rho", help="Time step exponent (polynomial, time_uniform, discrete)", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True), default=D.schedule_rho, show_default=True)
@_bool("--use_step_condition", D.use_step_condition, "SFD-v: one model for num_steps {}..{} via a step-condition "
       "embedding".format(*SFDV_NUM_STEPS))
@_bool("--is_second_stage", D.is_second_stage, "Second stage: distil a first-stage snapshot (--model_path) to 1 NFE")
@click.option("--model_path", help="Second stage: a first-stage snapshot. First stage: any EDM-format .pkl, any "
              "diffusers pipeline folder (DDPM/DDIM, SD 1.x/2.x), or with an LDM/SD --dataset_name its CompVis "
              "checkpoint or diffusers folder",
              metavar="PATH", type=str, default=None)
@click.option("--guidance_type", help="Guidance of LDM/SD backbones", type=click.Choice(["cfg", "uncond"]),
              default=None)
@click.option("--guidance_rate", help="Classifier-free guidance weight used when sampling", metavar="FLOAT",
              type=float, default=D.guidance_rate, show_default=True)
@_bool("--lpips", D.lpips, "Second stage, EDM backbones: add the LPIPS term on the last step (needs piq + weights)")
@click.option("--precision", help="fp16 (EDM's use_fp16, as the paper), bf16 (autocast) or fp32; mixed precision "
              "runs on CUDA only and falls back to fp32 if the loss turns NaN", type=click.Choice(PRECISIONS),
              default=D.precision, show_default=True)
@_bool("--channels_last", D.channels_last, "Run the networks in channels-last memory format")
@_bool("--compile", D.compile, "torch.compile the teacher and student calls (fixed shapes; first iteration compiles)")
@click.option("--teacher_batch", help="Teacher trajectories per call; > --batch-gpu groups accumulation "
              "rounds (speed), < --batch-gpu splits them (teacher memory)  [default: batch-gpu]", metavar="INT", type=click.IntRange(min=1), default=None)
@click.option("--captions", help="ms_coco: a local copy of the MS-COCO 30k caption CSV instead of the download (may "
              "be given with --resume)", metavar="CSV", type=str, default=None)
@click.option("--seed", help="Random seed  [default: random]", metavar="INT", type=int, default=None)
@click.option("--desc", help="String appended to the experiment folder name", metavar="STR", type=str, default=None)
@click.option("--nosubdir", help="Write into --outdir itself instead of a numbered sub-folder", is_flag=True)
@click.option("--tick", help="Status line / stats interval in kimg", metavar="KIMG",
              type=click.FloatRange(min=0, min_open=True), default=D.kimg_per_tick, show_default=True)
@click.option("--snap", help="Snapshot every this many ticks  [default: only at the end]", metavar="TICKS",
              type=click.IntRange(min=1), default=None)
@click.option("--dump", help="Dump training state every this many ticks (for resuming)  [default: never]",
              metavar="TICKS", type=click.IntRange(min=1), default=None)
@_bool("--bench", D.cudnn_benchmark, "Enable cuDNN benchmarking")
@click.option("--device", help="Device  [default: cuda if available, else cpu]", metavar="STR", type=str,
              default=None)
@click.option("--resume", help="Continue an interrupted run: its experiment number or a training-state-*.pt dump "
              "(the run's own training_options.json is used; only --outdir, --device and --dry-run may be given "
              "with it)", metavar="N|PATH",
              type=str, default=None)
@click.option("-n", "--dry-run", "dry_run", help="Print the resolved options and exit without writing anything",
              is_flag=True)
def main(**kwargs):
    opts = dnnlib.EasyDict(kwargs)
    cli.check_output_dir(opts.outdir, "--outdir")
    if opts.captions is not None:
        cli.check_input_file(opts.captions, "--captions")
    cli.check_device(opts.device)
    if opts.resume is not None:
        run_dir, dump = find_resume(opts.resume, opts.outdir)
        options_path = os.path.join(run_dir, "training_options.json")
        if not os.path.isfile(options_path):
            raise click.BadParameter(f"{run_dir} has no training_options.json", param_hint="--resume")
        with open(options_path) as f:
            c = dnnlib.EasyDict(json.load(f))
        device = cli.check_device(opts.device or c.get("device"), "--device (or the run's training_options.json)")
        check_resume_options(click.get_current_context(), run_config(opts, device, c.get("world_size", 1)), c)
        from training.state import dump_progress

        try:
            done_nimg = dump_progress(dump)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--resume") from None
        if done_nimg >= c.total_kimg * 1000:
            raise click.BadParameter(f"{run_dir} is finished ({done_nimg / 1000:g} of {c.total_kimg:g} kimg): "
                                     "nothing to resume; its final snapshot is in that folder", param_hint="--resume")
        return run_training(c, run_dir, resume_state=dump, dry_run=opts.dry_run, device=opts.device,
                            captions=opts.captions)
    if opts.dataset_name is not None and opts.dataset_name not in _dataset_names():
        raise click.BadParameter(f"unknown dataset {opts.dataset_name!r}; choose one of {', '.join(_dataset_names())}",
                                 param_hint="--dataset_name")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_options(opts, world_size)

    device = dist.init(opts.device)
    if opts.seed is None:
        seed = torch.randint(1 << 31, size=[], device=device)
        if dist.is_distributed():
            torch.distributed.broadcast(seed, src=0)
        opts.seed = int(seed)

    c = run_config(opts, device, dist.get_world_size())
    run_dir = opts.outdir if opts.nosubdir else next_run_dir(opts.outdir, run_name(opts))
    return run_training(c, run_dir, dry_run=opts.dry_run, nosubdir=opts.nosubdir, captions=opts.captions)


def run_config(opts, device, world_size):
    """A run's training_options.json: what training_loop is given, and world_size, which only records the run."""
    return dnnlib.EasyDict(
        dataset_name=opts.dataset_name, model_path=opts.model_path, is_second_stage=opts.is_second_stage,
        use_step_condition=opts.use_step_condition, num_steps=opts.num_steps, M=opts.M, afs=opts.afs,
        sampler_tea=opts.sampler_tea, max_order=opts.max_order, predict_x0=opts.predict_x0,
        thresholding=opts.thresholding,
        lower_order_final=opts.lower_order_final, schedule_type=opts.schedule_type,
        schedule_rho=opts.schedule_rho, guidance_type=opts.guidance_type, guidance_rate=opts.guidance_rate,
        batch_size=opts.batch, batch_gpu=opts.batch_gpu, total_kimg=opts.total_kimg, lr=opts.lr, seed=opts.seed,
        kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump, lpips=opts.lpips,
        # mixed precision applies on CUDA only; the options file says what runs
        precision=precision_that_runs(opts.precision, device), channels_last=opts.channels_last,
        compile=opts.compile, teacher_batch=opts.teacher_batch, cudnn_benchmark=opts.bench, world_size=world_size,
        device=str(device),
    )


# train.py options named otherwise in training_options.json
CONFIG_KEYS = dict(batch="batch_size", batch_gpu="batch_gpu", tick="kimg_per_tick", snap="snapshot_ticks",
                   dump="state_dump_ticks", bench="cudnn_benchmark")
# The options that --resume takes beside itself: where to find the run, where to run it, where its caption file lies,
# and the dry run.
RESUME_OPTIONS = ("resume", "outdir", "device", "captions", "dry_run")


def check_resume_options(ctx, given_config, run):
    """A resumed run keeps its training_options.json: an option written on the command line beside --resume must
    say what the run already has (the same command with --resume added resumes it), or it is refused."""
    sources = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    conflicts = []
    for param in ctx.command.params:
        if param.name in RESUME_OPTIONS or ctx.get_parameter_source(param.name) not in sources:
            continue
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        key = CONFIG_KEYS.get(param.name, param.name)
        if key not in run:
            conflicts.append(f"{flag} (a run does not keep it)")
        elif given_config[key] != run[key]:
            conflicts.append(f"{flag}={ctx.params[param.name]} (the run has {run[key]})")
    if conflicts:
        raise click.BadParameter(f"a resumed run keeps its training_options.json, so {', '.join(conflicts)} cannot "
                                 "apply; drop it or start a new run", param_hint="--resume")


# training_options.json keys that only record the run: world_size, and fp16 from runs before --precision.
RECORD_ONLY_OPTIONS = ("world_size", "fp16")


def run_training(c, run_dir, resume_state=None, dry_run=False, nosubdir=False, device=None, captions=None):
    """Print the options, then train into run_dir (created only once the network has loaded); a text-to-image
    network draws its training captions from `captions` (None: the MS-COCO download)."""
    if resume_state is not None:
        device = dist.init(device or c.get("device"))
        c.device = str(device)

    def print_options():
        dist.print0("Training options:")
        dist.print0(json.dumps(c, indent=2))
        dist.print0(f"Output directory: {run_dir}")
        if c.M == 0:
            dist.print0("Note: --M=0: no teacher points between the student's; the teacher takes the student's own "
                        f"{c.num_steps - 1} steps.")

    if dry_run:
        print_options()
        dist.print0("Dry run; exiting.")
        dist.shutdown()
        return

    from training.perceptual import PerceptualUnavailable
    from training.training_loop import load_teacher, training_loop

    cpu_threads = pick_cpu_threads() if torch.device(c.device).type == "cpu" else None

    def open_run_dir():
        """Once the network has loaded, so a failed load leaves no folder behind and prints no options for a run
        that never starts."""
        if dist.get_rank() != 0:
            return
        os.makedirs(run_dir, exist_ok=nosubdir or resume_state is not None)
        dnnlib.util.write_atomic(os.path.join(run_dir, "training_options.json"), json.dumps(c, indent=2))
        dnnlib.util.tee_stdout(os.path.join(run_dir, "log.txt"))
        print_options()
        if cpu_threads is not None and cpu_threads[0] < cpu_threads[1]:
            dist.print0(f"CPU threads: {cpu_threads[0]} of {cpu_threads[1]} cores; {cpu_threads[2]:.1f} were busy with "
                        "other work at the start (OMP_NUM_THREADS=N chooses).")

    try:
        cfg = DistillConfig(**{k: v for k, v in c.items() if k not in RECORD_ONLY_OPTIONS})
        loaded = load_teacher(cfg, torch.device(cfg.device))
        net = loaded[0].net  # (loaded network, teacher settings...)
        if captions is not None and hasattr(net, "use_caption_file"):
            net.use_caption_file(captions)  # the student and the teacher copy share it
        if captions is None and getattr(net, "needs_caption_file", False):
            raise click.BadParameter("a diffusers text-to-image pipeline has no caption file of its own: give "
                                     "--captions=CSV (a 'text' column) to draw training prompts from", param_hint="--captions")
        open_run_dir()
        training_loop(run_dir=run_dir, resume_state=resume_state, loaded=loaded, **vars(cfg))
    except (ValueError, pickle.UnpicklingError, dnnlib.DownloadError, PerceptualUnavailable, FileNotFoundError) as e:
        raise CommandError(str(e) or type(e).__name__) from None
    finally:
        dist.shutdown()


if __name__ == "__main__":
    cli.run(main)

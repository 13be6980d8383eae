"""Throughput of SFD training: s/kimg, achieved TFLOP/s, peak memory and a teacher/student breakdown.

Runs the real `training.training_loop` on a network with random weights (the cifar10 EDM architecture of the
backbone table, or `--tiny` for a CPU), written as an EDM pickle to a temporary folder. The first
`--warmup_kimg` are not measured: the loop is asked for one tick per iteration and s/kimg is taken from its
own stats.jsonl between the last warm-up tick and the end. Teacher, student-forward and optimizer time come
from CUDA events placed around `sfd_loss.teacher_trajectory`, `sfd_loss.student_step` and `optimizer.step`
(no extra host synchronisation); "other" (loss, backward, bookkeeping) is the rest.

FLOPs: F = one forward per image counted by torch's FlopCounterMode; T and S = network calls per trajectory
of the teacher and of the student, counted by hooks while measuring; FLOPs per trajectory = F·(T + 3·S)
(a student call is a forward plus a backward, which costs about two forwards).

Examples:

\b
# The issue-8 setting: cifar10 architecture, batch 128, mixed precision, 2-NFE recipe
python benchmarks/bench_train.py --batch=128 --warmup_kimg=0.5 --kimg=2

\b
# fp32, and SFD-v (step layers, num_steps drawn from the SFD-v range each iteration)
python benchmarks/bench_train.py --precision=fp32
python benchmarks/bench_train.py --use_step_condition

\b
# CPU smoke run
python benchmarks/bench_train.py --tiny --device=cpu --batch=8 --warmup_kimg=0.008 --kimg=0.016
"""

import contextlib
import inspect
import json
import math
import os
import sys
import tempfile

import click
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
import solvers  # noqa: E402
from training.precision import PRECISIONS  # noqa: E402


class LoopProbe:
    """Timers and call counters around the functions the training loop calls, active after warm-up; with a
    profiler, the iteration after the measured ones (from its teacher call to its tick) is profiled instead."""

    def __init__(self, device, warmup_nimg, end_nimg=None, profiler=None):
        self.watch = common.Stopwatch(device)
        self.warmup_nimg = warmup_nimg
        self.end_nimg = end_nimg  # trajectories after which measuring stops (None: never)
        self.profiler = profiler
        self.seen_nimg = 0          # trajectories whose teacher has been started
        self.measured_nimg = 0
        self.measuring = False
        self.spans = dict(teacher=[], student_forward=[], optimizer=[])
        self.images = dict(teacher=0, student=0)  # images passed through each network while measuring
        self._hooked = set()
        self._handles = []
        self._opt_start = None

    def _count_calls(self, module, key):
        if id(module) in self._hooked:
            return
        self._hooked.add(id(module))

        def count(mod, args):
            if self.measuring:
                self.images[key] += args[0].shape[0]

        self._handles.append(module.register_forward_pre_hook(count))

    def wrap_teacher(self, original):
        def teacher_trajectory(teacher, latents, *args, **kwargs):
            # An iteration starts with its teacher calls; warm-up ends on an iteration boundary.
            past_end = self.end_nimg is not None and self.seen_nimg >= self.end_nimg
            self.measuring = self.seen_nimg >= self.warmup_nimg and not past_end
            if past_end and self.profiler is not None:
                self.profiler.start()
            self.seen_nimg += latents.shape[0]
            self._count_calls(teacher, "teacher")
            if not self.measuring:
                return original(teacher, latents, *args, **kwargs)
            self.measured_nimg += latents.shape[0]
            start = self.watch.mark()
            out = original(teacher, latents, *args, **kwargs)
            self.spans["teacher"].append((start, self.watch.mark()))
            return out

        return teacher_trajectory

    def wrap_student(self, original):
        def student_step(net, *args, **kwargs):
            self._count_calls(net, "student")
            if not self.measuring:
                return original(net, *args, **kwargs)
            start = self.watch.mark()
            out = original(net, *args, **kwargs)
            self.spans["student_forward"].append((start, self.watch.mark()))
            return out

        return student_step

    def _before_step(self, optimizer, args, kwargs):
        self._opt_start = self.watch.mark() if self.measuring else None

    def _after_step(self, optimizer, args, kwargs):
        if self._opt_start is not None:
            self.spans["optimizer"].append((self._opt_start, self.watch.mark()))
            self._opt_start = None

    @contextlib.contextmanager
    def installed(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        from training import sfd_loss
        from training import training_loop as loop_module

        saved = dict(teacher=sfd_loss.teacher_trajectory, student=sfd_loss.student_step,
                     snapshot=getattr(loop_module, "save_snapshot", None), tick=loop_module.TickLog.write)
        sfd_loss.teacher_trajectory = self.wrap_teacher(saved["teacher"])
        sfd_loss.student_step = self.wrap_student(saved["student"])
        if self.profiler is not None:
            def write_tick(log, *args, **kwargs):
                self.profiler.stop()  # the profiled iteration ends where its tick begins
                return saved["tick"](log, *args, **kwargs)

            loop_module.TickLog.write = write_tick
        if saved["snapshot"] is not None:
            loop_module.save_snapshot = lambda *args, **kwargs: None  # the benchmark keeps no network
        handles = [register_optimizer_step_pre_hook(self._before_step),
                   register_optimizer_step_post_hook(self._after_step)]
        try:
            yield self
        finally:
            sfd_loss.teacher_trajectory, sfd_loss.student_step = saved["teacher"], saved["student"]
            loop_module.TickLog.write = saved["tick"]
            if saved["snapshot"] is not None:
                loop_module.save_snapshot = saved["snapshot"]
            for h in handles + self._handles:
                h.remove()

    def phase_seconds(self):
        self.watch.sync()
        return {name: sum(self.watch.seconds(a, b) for a, b in spans) for name, spans in self.spans.items()}


def parse_loop_kwargs(pairs, loop_fn):
    """--loop_kwarg NAME=VALUE pairs (VALUE as JSON, else a string), each a keyword training_loop accepts."""
    from training.config import OPTION_NAMES

    params = inspect.signature(loop_fn).parameters
    accepted = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted |= set(OPTION_NAMES)  # training_loop(**options): the fields of DistillConfig
    out = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--loop_kwarg")
        if name not in accepted:
            raise click.BadParameter(f"training_loop has no keyword {name!r}", param_hint="--loop_kwarg")
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError:
            out[name] = text
    return out


def read_ticks(run_dir):
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def measure(*, tiny, use_step_condition, batch, warmup_kimg, kimg, num_steps, M, afs, sampler_tea, max_order,
            precision, device, seed=0, loop_kwargs=None, profile=False):
    """Run the loop and return the result dict (see the module docstring). With `profile`, one more iteration runs
    after the measured ones under torch.profiler, and the result holds its summary (benchmarks/profiling.py)."""
    from benchmarks.profiling import IterationProfiler
    from torch_utils.persistence import save_edm_pickle
    from training.training_loop import training_loop

    warmup_iters = max(1, math.ceil(warmup_kimg * 1000 / batch - 1e-9))
    measured_iters = max(1, math.ceil(kimg * 1000 / batch - 1e-9))
    total_nimg = (warmup_iters + measured_iters + int(profile)) * batch

    net = common.build_edm(tiny, use_step_condition=use_step_condition, seed=seed).to(device)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    step_condition = num_steps if use_step_condition else None
    flops_fwd = common.forward_flops(lambda: net(x, torch.full([2], 1.0, device=device),
                                                 step_condition=step_condition), batch=2)
    params = common.num_params(net)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        model_path = os.path.join(tmp, "teacher.pkl")
        save_edm_pickle(model_path, {"ema": net.cpu()})
        net = None  # the loop loads its own copy
        profiler = IterationProfiler(device) if profile else None
        probe = LoopProbe(device, warmup_nimg=warmup_iters * batch,
                          end_nimg=(warmup_iters + measured_iters) * batch, profiler=profiler)
        run_dir = os.path.join(tmp, "run")
        os.makedirs(run_dir)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loop_options = dict(
            run_dir=run_dir, dataset_name=None if tiny else "cifar10", model_path=model_path,
            use_step_condition=use_step_condition, num_steps=num_steps, M=M, afs=afs, sampler_tea=sampler_tea,
            max_order=max_order, batch_size=batch,
            total_kimg=(total_nimg - 0.5) / 1000,       # ends exactly after the last iteration
            kimg_per_tick=(batch - 0.5) / 1000,         # one tick (stats line) per iteration
            seed=seed, precision=precision, lpips=False, cache_root=os.path.join(tmp, "src"), device=device,
            progress=False)
        loop_options.update(loop_kwargs or {})  # --fast and --loop_kwarg win over the options above
        with probe.installed(), contextlib.redirect_stdout(sys.stderr):  # stdout keeps only the report
            training_loop(**loop_options)
        ticks = read_ticks(run_dir)
    if len(ticks) != warmup_iters + measured_iters + int(profile):
        raise RuntimeError(f"expected one tick per iteration ({warmup_iters + measured_iters + int(profile)}), got "
                           f"{len(ticks)}: the loop's tick rule changed; update bench_train.measure")
    last_warm, measured = ticks[warmup_iters - 1], ticks[warmup_iters:warmup_iters + measured_iters]
    seconds = measured[-1]["total_sec"] - last_warm["total_sec"]
    measured_kimg = measured[-1]["kimg"] - last_warm["kimg"]
    s_per_kimg = seconds / measured_kimg
    if probe.measured_nimg != measured_iters * batch:
        raise RuntimeError(f"probe saw {probe.measured_nimg} measured trajectories, expected {measured_iters * batch}")

    teacher_calls = probe.images["teacher"] / probe.measured_nimg
    student_calls = probe.images["student"] / probe.measured_nimg
    flops_traj = flops_fwd * (teacher_calls + 3 * student_calls)
    tflops = flops_traj * 1000 / s_per_kimg / 1e12
    phases = probe.phase_seconds()
    per_kimg = {f"{k}_s_per_kimg": v / measured_kimg for k, v in phases.items()}
    per_kimg["other_s_per_kimg"] = s_per_kimg - sum(per_kimg.values())
    peak = max(t["peak_mem_gb"] for t in measured)
    if device.type != "cuda":
        peak = max(peak, common.peak_memory_gb(device))
    result = dict(
        bench="train", env=common.environment(device),
        settings=dict(network="tiny" if tiny else "cifar10", params=params, use_step_condition=use_step_condition,
                      batch=batch, num_steps=num_steps, M=M, afs=afs, sampler_tea=sampler_tea, max_order=max_order,
                      **{**dict(precision=precision), **(loop_kwargs or {})},
                      mixed_precision=bool(measured[-1].get("mixed_precision")),
                      warmup_kimg=warmup_iters * batch / 1000, measured_kimg=measured_kimg),
        s_per_kimg=s_per_kimg, trajectories_per_s=1000 / s_per_kimg, tflops=tflops,
        flops_per_forward=flops_fwd, teacher_forwards_per_traj=teacher_calls,
        student_fwdbwd_per_traj=student_calls, flops_per_traj=flops_traj,
        flops_formula="F*(T+3*S): F=FLOPs of one forward per image, T=teacher forwards, S=student forward+backward",
        peak_mem_gb=peak, peak_mem_kind="cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
        reserved_gb=torch.cuda.memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        **per_kimg,
    )
    if profile:
        if profiler.summary is None:
            raise RuntimeError("the profiled iteration never reached its tick: update bench_train.LoopProbe")
        result["profile"] = profiler.summary
    result["summary"] = [
        f"{s_per_kimg:.3f} s/kimg ({1000 / s_per_kimg:.1f} trajectories/s) over {measured_kimg:g} kimg after "
        f"{warmup_iters * batch / 1000:g} kimg warm-up",
        f"{tflops:.4g} TFLOP/s = F*(T + 3*S)*1000 / (s/kimg) with F = {flops_fwd / 1e9:.4g} GFLOP per forward per "
        f"image, T = {teacher_calls:.2f} teacher forwards, S = {student_calls:.2f} student forward+backward "
        f"per trajectory ({flops_traj / 1e9:.4g} GFLOP/trajectory, {flops_traj / 1e9:.4g} TFLOP/kimg)",
        f"peak memory {peak:.2f} GB ({result['peak_mem_kind']}, GB = 2^30 bytes)",
        "breakdown s/kimg: " + ", ".join(f"{k.replace('_s_per_kimg', '')} {v:.3f}" for k, v in per_kimg.items()),
    ]
    if profile:
        result["summary"] += ["profile of one more iteration (not timed above):"] + profiler.summary["text"].splitlines()
    return result


@click.command(help=__doc__)
@click.option("--tiny", is_flag=True, help="A very small SongUNet instead of the cifar10 architecture (CPU runs)")
@click.option("--use_step_condition", is_flag=True,
              help="SFD-v: step layers, num_steps drawn from training.sfd_loss.SFDV_NUM_STEPS per iteration")
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True, help="Trajectories per iteration")
@click.option("--warmup_kimg", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Not measured (rounded up to whole iterations, at least one)")
@click.option("--kimg", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Measured (rounded up to whole iterations)")
@click.option("--num_steps", type=click.IntRange(min=2), default=4, show_default=True, help="Student time points")
@click.option("--M", "M", type=click.IntRange(min=0), default=3, show_default=True, help="Teacher points inserted")
@click.option("--afs/--no-afs", default=True, show_default=True, help="Analytical first step")
@click.option("--sampler_tea", type=click.Choice(sorted(solvers.SOLVERS)), default="dpmpp", show_default=True,
              help="Teacher solver")
@click.option("--max_order", type=int, default=3, show_default=True, help="Teacher multistep order")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True,
              help="training_loop's precision (train.py's --precision; mixed precision on CUDA only)")
@click.option("--loop_kwarg", "loop_kwarg", multiple=True, metavar="NAME=VALUE",
              help="Another training_loop keyword (VALUE parsed as JSON), e.g. a precision option; repeatable")
@click.option("--device", default=None, help="Device  [default: cuda if available]")
@click.option("--fast", is_flag=True,
              help="The fast path (benchmarks/common.py FAST_TRAIN: " + ", ".join(common.as_pairs(common.FAST_TRAIN))
              + "); --loop_kwarg entries override it")
@click.option("--profile", is_flag=True,
              help="Profile one more iteration after the measured ones (top kernels, launches, host syncs)")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also append the JSON line to FILE")
def main(tiny, device, json_path, loop_kwarg, fast, **opts):
    from training.training_loop import training_loop

    loop_kwargs = parse_loop_kwargs((common.as_pairs(common.FAST_TRAIN) if fast else ()) + loop_kwarg, training_loop)
    device = common.pick_device(device)
    result = measure(tiny=tiny, device=device, loop_kwargs=loop_kwargs, **opts)
    result["settings"]["fast"] = fast
    common.report(result, json_path)


if __name__ == "__main__":
    main()

"""SFD fine-tuning loop (paper Alg. 1): teacher trajectory, then one Adam update per student step.

Reads top to bottom as the algorithm. It never branches on the backbone: everything it needs comes from the
loaded network (shape, label_dim, σ range) and from the settings resolved by train.py.
"""

import collections
import contextlib
import copy
import json
import math
import os
import random
import resource
import time

import numpy as np
import torch

import dnnlib

import solvers
from models import load_network, save_snapshot
from torch_utils import cli
from torch_utils import distributed as dist
from training import sfd_loss
from training.sfd_loss import SFDV_NUM_STEPS
from training import state as train_state
from training.precision import NonFiniteWatch, RunMode, maybe_compile, prepare_module
from training.perceptual import PerceptualLoss

SNAPSHOT_SETTINGS = (
    "dataset_name", "model_source", "num_steps", "M", "afs", "schedule_type", "schedule_rho", "sigma_min",
    "sigma_max", "use_step_condition", "sampler_tea", "max_order", "predict_x0", "lower_order_final",
    "is_second_stage", "guidance_type", "guidance_rate",
)

def draw_sfdv_num_steps(step_rng):
    """SFD-v's student num_steps for one iteration: uniform on SFDV_NUM_STEPS, both ends included."""
    return step_rng.randint(*SFDV_NUM_STEPS)


def make_optimizer(params, lr):
    """The student's optimizer (paper §4): Adam, betas (0.9, 0.999), eps 1e-8."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def solver_options(sampler_tea, max_order, predict_x0, lower_order_final, thresholding=True):
    """The options that the teacher solver takes, from those given (None: the solver's own default)."""
    given = dict(max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                 thresholding=thresholding)
    return {k: v for k, v in given.items() if k in solvers.TABLE[sampler_tea].options and v is not None}


def check_guidance(own, guidance_type, name):
    """The guidance a backbone trains with. `own` is its own ('uncond' for LDM, 'cfg' for SD, None for a backbone
    without guidance); --guidance_type must match it (or be left out where it is 'uncond' or None)."""
    if own is None:
        if guidance_type is not None:
            raise ValueError(f"{name or 'this network'} has no guidance; drop --guidance_type (it applies to the LDM "
                             f"and Stable Diffusion backbones)")
        return None
    if guidance_type == own or (own == "uncond" and guidance_type is None):
        return own
    hint = " --guidance_rate=W (e.g. 7.5; sampling uses it)" if own == "cfg" else ""
    raise ValueError(f"{name or 'this backbone'} needs --guidance_type={own}{hint}, got {guidance_type!r}")


def resolve_guidance(net, guidance_type, dataset_name):
    return check_guidance(getattr(net, "guidance_type", None), guidance_type, dataset_name)


def _peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load_teacher(dataset_name, model_path, is_second_stage, use_step_condition, sampler_tea, max_order, predict_x0,
                 lower_order_final, thresholding, schedule_type, schedule_rho, guidance_type, device, cache_root):
    """The network to distil and its teacher's sampling settings: (loaded, TeacherConfig, use_step_condition,
    guidance_type). The second stage's teacher is the first-stage model under Euler with its own stored settings."""
    if is_second_stage:
        loaded = load_network(model_path=model_path, device=device, cache_root=cache_root)
        first = loaded.settings
        if loaded.source not in ("snapshot", "paper_snapshot") or "num_steps" not in first:
            raise ValueError(f"--model_path {model_path}: the second stage needs a first-stage SFD/SFD-v snapshot")
        if dataset_name and loaded.dataset_name and dataset_name != loaded.dataset_name:
            raise ValueError(f"--model_path was distilled from {loaded.dataset_name!r}, not --dataset_name "
                             f"{dataset_name!r}")
        use_step_condition = bool(first.get("use_step_condition", False))
        teacher_cfg = sfd_loss.TeacherConfig(
            solver="euler", schedule_type=first["schedule_type"], schedule_rho=first["schedule_rho"],
            sigma_min=first["sigma_min"], sigma_max=first["sigma_max"], afs=bool(first["afs"]),
            conditioned=use_step_condition, solver_options={},
        )
    else:
        loaded = load_network(dataset_name=dataset_name, model_path=model_path, device=device,
                              use_step_condition=use_step_condition, cache_root=cache_root)
        teacher_cfg = sfd_loss.TeacherConfig(
            solver=sampler_tea, schedule_type=schedule_type, schedule_rho=schedule_rho,
            sigma_min=loaded.settings["sigma_min"], sigma_max=loaded.settings["sigma_max"], afs=False,
            solver_options=solver_options(sampler_tea, max_order, predict_x0, lower_order_final, thresholding),
        )
    guidance_type = resolve_guidance(loaded.net, guidance_type, loaded.dataset_name)
    return loaded, teacher_cfg, use_step_condition, guidance_type


def training_loop(
    run_dir=None,  # output folder, or a callable returning it once the network has loaded (None on ranks > 0)
    dataset_name=None,
    model_path=None,
    is_second_stage=False,
    use_step_condition=False,
    num_steps=4,
    M=3,
    afs=True,
    sampler_tea="dpmpp",
    max_order=None,
    predict_x0=True,
    thresholding=True,  # DPM-Solver++ teacher: dynamic thresholding of data predictions (the paper's code: always)
    lower_order_final=True,
    schedule_type="polynomial",
    schedule_rho=7.0,
    guidance_type=None,
    guidance_rate=0.0,
    batch_size=128,
    batch_gpu=None,
    total_kimg=200,
    lr=5e-5,
    seed=0,
    kimg_per_tick=1,
    snapshot_ticks=None,  # None: one snapshot at the end
    state_dump_ticks=None,
    lpips=True,
    precision="fp16",  # 'fp16' (EDM's use_fp16, the paper), 'bf16' (autocast) or 'fp32'; mixed ones on CUDA only
    mixed_on_cpu=False,  # arm fp16/bf16 on the CPU too (tests of the mixed-precision path)
    channels_last=False,
    compile=False,  # torch.compile the teacher and student calls
    teacher_batch=None,  # teacher trajectories per call (all accumulation rounds at once when larger); None: batch_gpu
    cudnn_benchmark=True,
    cache_root="./src",
    resume_state=None,  # a training-state dump to continue from (same run folder)
    device=None,
    progress=True,
):
    device = torch.device(device) if device is not None else torch.device("cpu")
    start_time = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    np.random.seed((seed * world + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    step_rng = random.Random(seed)  # same on every rank: all ranks must draw the same SFD-v num_steps
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark

    # Batch geometry: batch = batch_gpu × accumulation rounds × ranks.
    batch_per_rank = batch_size // world
    batch_gpu = min(batch_gpu or batch_per_rank, batch_per_rank)
    num_rounds = batch_per_rank // batch_gpu
    assert batch_size == batch_gpu * num_rounds * world, "train.py validates the batch geometry"

    # Load the network; rank 0 first so that only it downloads, and a failure on one rank stops every rank.
    loaded, teacher_cfg, use_step_condition, guidance_type = dist.rank0_first(lambda: load_teacher(
        dataset_name, model_path, is_second_stage, use_step_condition, sampler_tea, max_order, predict_x0,
        lower_order_final, thresholding, schedule_type, schedule_rho, guidance_type, device, cache_root))
    if callable(run_dir):
        run_dir = run_dir()
    sfdv = use_step_condition and not is_second_stage  # a new student length every iteration
    net, teacher = split_teacher(loaded, freeze_step_layers=sfdv)
    mode = RunMode(precision, device, (net, teacher), armed_on_cpu=mixed_on_cpu)
    for module in (net, teacher):
        prepare_module(module, channels_last=channels_last)
    dist.print0(f"Parameters: {sum(p.numel() for p in net.parameters()):,} | batch {batch_size} = "
                f"{batch_gpu} per round × {num_rounds} rounds × {world} ranks | device {device}"
                + (f" | {dist.backend()} process group, DDP" if dist.is_distributed() else ""))

    perceptual = None
    if is_second_stage and loaded.settings.get("model_source", "edm") == "edm" and lpips:
        perceptual = dist.rank0_first(lambda: PerceptualLoss(device=device, cache_root=cache_root))
    settings = dict(
        dataset_name=loaded.dataset_name, model_source=loaded.settings.get("model_source", "edm"),
        num_steps=num_steps, M=M, afs=afs, schedule_type=teacher_cfg.schedule_type,
        schedule_rho=teacher_cfg.schedule_rho, sigma_min=teacher_cfg.sigma_min, sigma_max=teacher_cfg.sigma_max,
        use_step_condition=use_step_condition, sampler_tea=teacher_cfg.solver, max_order=max_order,
        predict_x0=predict_x0, lower_order_final=lower_order_final, thresholding=thresholding,
        is_second_stage=is_second_stage, guidance_type=guidance_type, guidance_rate=guidance_rate)
    if sfdv:
        settings["step_condition_range"] = list(SFDV_NUM_STEPS)
    if is_second_stage:
        settings["first_stage"] = {k: loaded.settings.get(k) for k in SNAPSHOT_SETTINGS if k in loaded.settings}

    optimizer = make_optimizer(net.parameters(), lr)
    ddp = net
    teacher_fn = maybe_compile(teacher, compile)
    if dist.is_distributed():
        dist.broadcast_module(net)
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=True)
    student_fn = maybe_compile(ddp, compile)

    def distill_schedule(steps, teacher_M):
        return sfd_loss.make_distill_schedule(steps, teacher_M, teacher_cfg.sigma_min, teacher_cfg.sigma_max,
                                              teacher_cfg.schedule_type, teacher_cfg.schedule_rho, net=teacher,
                                              device=device)

    fixed_schedule = distill_schedule(num_steps, M)
    cur_nimg, cur_tick = 0, 0
    stats_file = os.path.join(run_dir, "stats.jsonl") if run_dir else None
    if resume_state is not None:
        cur_nimg, cur_tick = resume(resume_state, net, optimizer, step_rng, mode, device, run_dir, stats_file)
    dist.print0(f"Training for {total_kimg} kimg...")
    log = TickLog(SFDV_NUM_STEPS[1] if sfdv else num_steps, device, total_kimg, cur_nimg, stats_file,
                  start_time, progress and rank == 0)
    nonfinite = NonFiniteWatch(device, distributed=dist.is_distributed())  # any NaN/inf loss so far

    while True:
        # SFD-v: a fresh student length (and matching teacher density) each iteration.
        cur_steps = draw_sfdv_num_steps(step_rng) if sfdv else num_steps
        schedule = distill_schedule(cur_steps, sfd_loss.SFDV_TEACHER_M) if sfdv else fixed_schedule
        # As a tensor, not a Python int: a compiled student then runs one graph for every step count (an int is
        # a constant to torch.compile, one recompilation per value of the SFD-v range).
        step_condition = (torch.full([batch_gpu], float(cur_steps), device=device) if use_step_condition
                          else None)
        latents, labels, conds = draw_inputs(net, batch_gpu, num_rounds, device)
        result = sfd_iteration(student_fn, optimizer, teacher_fn, latents, schedule, teacher_cfg, afs,
                               labels=labels, conds=conds, step_condition=step_condition, perceptual=perceptual,
                               teacher_batch=teacher_batch or batch_gpu,
                               no_sync=ddp.no_sync if dist.is_distributed() else None, mode=mode,
                               nonfinite=nonfinite)
        log.add(result.losses)
        if mode.mixed:
            nonfinite.publish()

        # LR ÷ 10 once half of the trajectories are done (paper §4, "learning rate").
        if cur_nimg / 1000 >= 0.5 * total_kimg:
            for g in optimizer.param_groups:
                g["lr"] = lr / 10

        cur_nimg += batch_size
        done = cur_nimg >= total_kimg * 1000
        log.advance(cur_nimg)
        if not done and cur_nimg < log.tick_start_nimg + kimg_per_tick * 1000:
            continue

        if mode.mixed and nonfinite.seen(now=True):  # the loop synchronises here anyway (stats, snapshots)
            fall_back(mode)
        log.write(cur_tick, cur_nimg, optimizer.param_groups[0]["lr"], mode)
        if (snapshot_ticks and cur_tick % snapshot_ticks == 0 and cur_tick > 0) or done:
            check_ranks_in_sync(net)
            if rank == 0 and run_dir:
                save_snapshot(os.path.join(run_dir, f"network-snapshot-{cur_nimg // 1000:06d}.safetensors"), net,
                              settings)
            dist.barrier()
        cur_tick += 1
        if state_dump_ticks and (cur_tick % state_dump_ticks == 0 or done):
            dump_state(run_dir, net, optimizer, cur_nimg, cur_tick, step_rng, mode, device)
        if done:
            break

    log.close()
    dist.print0(f"Done: {cur_nimg / 1000:g} kimg in {cli.format_time(time.time() - start_time)}.")
    return dnnlib.EasyDict(net=net, teacher=teacher, settings=settings, run_dir=run_dir, kimg=cur_nimg / 1000)


def split_teacher(loaded, freeze_step_layers):
    """(student, frozen teacher) from the loaded network. The teacher runs on the loaded weights (a latent model's
    EMA weights); the student starts from the live weights where the checkpoint has them, as the paper does."""
    net = loaded.net
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    if loaded.student_unet is not None:
        from models.latent.loading import copy_unet_weights

        copy_unet_weights(net.model.diffusion_model, *loaded.student_unet)
        loaded.student_unet = None
    if freeze_step_layers:
        teacher.ignore_step_condition()  # fresh step layers must not disturb the pre-trained teacher
    net.train().requires_grad_(True)
    for module in (net, teacher):
        if hasattr(module, "guidance_rate"):
            module.guidance_rate = 1.0  # SD trains on the conditional prediction only; sampling uses guidance_rate
    return net, teacher


def draw_inputs(net, batch_gpu, num_rounds, device):
    """Per accumulation round: unit latents, one-hot labels (class-conditional nets) and conditions (text nets)."""
    shape = [batch_gpu, net.img_channels, net.img_resolution, net.img_resolution]
    latents = [torch.randn(shape, device=device) for _ in range(num_rounds)]
    labels = [None] * num_rounds
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if label_dim:
        eye = torch.eye(label_dim, device=device)
        labels = [eye[torch.randint(label_dim, size=[batch_gpu], device=device)] for _ in range(num_rounds)]
    conds = [(None, None)] * num_rounds
    if hasattr(net, "draw_conditions"):  # text-conditioned backbones (SD) draw e.g. random captions
        conds = [net.draw_conditions(batch_gpu, device) for _ in range(num_rounds)]
    return latents, labels, conds


def resume(path, net, optimizer, step_rng, mode, device, run_dir, stats_file):
    """Load a training-state dump into the run; returns (cur_nimg, cur_tick)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    state = train_state.load_training_state(path)
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])  # carries the current LR, i.e. the LR phase
    train_state.restore_step_rng(step_rng, state["step_rng"])
    if not state["use_mixed"]:
        mode.fall_back_to_fp32()
    if len(state["rank_rng"]) == world:
        train_state.restore_rng(state["rank_rng"][rank], device)
    else:
        dist.print0(f"Note: the dump was written by {len(state['rank_rng'])} ranks and this run has {world}: "
                    f"the per-rank random streams (latents) start afresh instead of continuing.")
    if run_dir:
        train_state.remove_stale_temporaries(run_dir)
        train_state.trim_stats(stats_file, state["cur_nimg"] / 1000)
    dist.print0(f"Resuming from {path} at {state['cur_nimg'] / 1000:g} kimg (tick {state['cur_tick']}).")
    return state["cur_nimg"], state["cur_tick"]


def dump_state(run_dir, net, optimizer, cur_nimg, cur_tick, step_rng, mode, device):
    """Write a resumable training state (rank 0), with every rank's random streams."""
    rank_rng = [train_state.capture_rng(device)]
    if dist.is_distributed():
        rank_rng = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(rank_rng, train_state.capture_rng(device))
    if dist.get_rank() == 0 and run_dir:
        train_state.save_training_state(
            os.path.join(run_dir, f"training-state-{cur_nimg // 1000:06d}.pt"), net=net, optimizer=optimizer,
            cur_nimg=cur_nimg, cur_tick=cur_tick, step_rng=step_rng, use_mixed=mode.mixed, rank_rng=rank_rng)
    dist.barrier()


class TickLog:
    """Per-step losses averaged over a tick, the status line, stats.jsonl and the progress bar."""

    def __init__(self, max_steps, device, total_kimg, cur_nimg, stats_file, start_time, progress):
        self.loss_sum = torch.zeros(max_steps - 1, device=device)
        self.loss_count = torch.zeros(max_steps - 1, device=device)
        self.device, self.total_kimg, self.stats_file, self.start_time = device, total_kimg, stats_file, start_time
        self.tick_start_nimg, self.tick_start_time = cur_nimg, time.time()
        # (time, nimg) at the end of the latest iterations. The ETA uses their rate: it leaves out the run's first
        # iteration, which pays one-time costs (kernel selection, allocations, compilation), so the ETA after tick 0
        # is not that iteration's rate spread over the whole run.
        self.marks = collections.deque(maxlen=64)
        self.bar = None
        if progress:
            from tqdm import tqdm

            # Fixed decimals for the count ("1012/2000", "12.3/50", "0.010/0.01"): a ".3g" count turns to
            # "1.01e+03" past 1000 kimg.
            decimals = min(3, max(0, 2 - math.floor(math.log10(total_kimg)))) if total_kimg > 0 else 3
            self.bar = tqdm(total=total_kimg, initial=cur_nimg / 1000, unit="kimg", dynamic_ncols=True, leave=False,
                            bar_format=f"{{l_bar}}{{bar}}| {{n:.{decimals}f}}/{{total:g}} kimg "
                                       "[{elapsed}<{remaining}]{postfix}")

    def add(self, losses):
        """losses[step][round]: the iteration's detached loss maps."""
        for i, per_round in enumerate(losses):
            for loss in per_round:
                self.loss_sum[i] += loss.mean() / len(per_round)
            self.loss_count[i] += 1

    def advance(self, cur_nimg):
        """Move the bar to cur_nimg (set, not summed: a sum of batch/1000 steps drifts past the total)."""
        self.marks.append((time.time(), cur_nimg))
        if self.bar is not None:
            self.bar.update(min(cur_nimg / 1000, self.total_kimg) - self.bar.n)

    def write(self, cur_tick, cur_nimg, lr, mode):
        """End a tick: one status line and one stats.jsonl record (rank 0), then start the next tick."""
        tick_time = time.time() - self.tick_start_time
        sec_per_kimg = tick_time / max(cur_nimg - self.tick_start_nimg, 1) * 1000
        per_step = (dist.all_reduce_mean(self.loss_sum) / self.loss_count.clamp(min=1)).tolist()
        seen = self.loss_count.tolist()
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        recent = (t1 - t0) / (n1 - n0) * 1000 if n1 > n0 else sec_per_kimg
        eta = recent * max(self.total_kimg - cur_nimg / 1000, 0)
        stats = dict(tick=cur_tick, kimg=cur_nimg / 1000, sec_per_kimg=sec_per_kimg,
                     total_sec=time.time() - self.start_time, peak_mem_gb=_peak_memory_gb(self.device),
                     lr=lr, mixed_precision=mode.mixed, precision=mode.precision,
                     device=cli.machine_name(self.device), ranks=dist.get_world_size(),
                     loss={f"step{i}": v for i, (v, n) in enumerate(zip(per_step, seen)) if n > 0})
        loss_text = " ".join(f"{v:.4f}" for v, n in zip(per_step, seen) if n > 0)
        line = (f"tick {cur_tick:<4d} kimg {cur_nimg / 1000:<8.2f} loss/step [{loss_text}] sec/kimg "
                f"{sec_per_kimg:<7.2f} mem {stats['peak_mem_gb']:.2f}GB eta {cli.format_time(eta)}")
        if self.bar is not None:
            self.bar.write(line)
            self.bar.set_postfix_str(f"loss {sum(per_step) / max(1, sum(n > 0 for n in seen)):.4f}")
        elif dist.get_rank() == 0:
            print(line, flush=True)
        if self.stats_file:
            with open(self.stats_file, "a") as f:
                f.write(json.dumps(dict(stats, timestamp=time.time())) + "\n")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.tick_start_nimg, self.tick_start_time = cur_nimg, time.time()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def sfd_iteration(student, optimizer, teacher, latents, schedule, teacher_cfg, afs, labels=None, conds=None,
                  step_condition=None, perceptual=None, teacher_batch=None, no_sync=None, mode=None, nonfinite=None):
    """One SFD iteration (paper Alg. 1, design §5) on given unit-Gaussian latents, one tensor per accumulation round.

    The frozen teacher draws its trajectory without gradients (`batched_teacher`). Then, for each student interval
    i, the student takes ONE Euler step from its own detached previous output (x_0 = latents·t_0) to t_{i+1}; the
    per-element L1 distance to teacher point i+1 is back-propagated as loss.sum() / batch (all rounds together),
    gradients pass through nan_to_num, and the optimizer takes one step. The AFS step (i = 0 with afs) calls no
    network and updates nothing.

    student / teacher: the callables run (possibly compiled or DDP-wrapped); the optimizer holds the student's
    parameters. no_sync: DDP's no_sync (skips the gradient all-reduce on all but the last round). mode/nonfinite:
    the loop's precision mode and NaN watch (None: plain fp32, no watch). Returns the teacher targets per round
    and the detached loss maps as losses[step][round].
    """
    num_rounds = len(latents)
    batch = sum(len(z) for z in latents)
    labels = labels if labels is not None else [None] * num_rounds
    conds = conds if conds is not None else [(None, None)] * num_rounds
    autocast = mode.autocast if mode is not None else contextlib.nullcontext
    with autocast():
        targets = batched_teacher(teacher, latents, labels, conds, schedule, teacher_cfg,
                                  teacher_batch or len(latents[0]))
    # Checked once the teacher work is queued: on CUDA this waits for the previous iteration only (no stall).
    if nonfinite is not None and mode.mixed and nonfinite.seen():
        fall_back(mode)
    x = [latents[k] * schedule.t_steps[0] for k in range(num_rounds)]
    num_steps = len(schedule.t_steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    losses = []
    for i in range(num_steps - 1):
        update = not (afs and i == 0)  # the AFS step calls no network: nothing to learn
        optimizer.zero_grad(set_to_none=True)
        losses.append([])
        for k in range(num_rounds):
            ctx = no_sync() if (no_sync is not None and k < num_rounds - 1) else contextlib.nullcontext()
            with ctx:
                with torch.set_grad_enabled(update), autocast():
                    out = sfd_loss.student_step(student, x[k], schedule, i, afs, class_labels=labels[k],
                                                condition=conds[k][0], unconditional_condition=conds[k][1],
                                                step_condition=step_condition)
                    out = out.float()
                    loss = sfd_loss.l1_loss(out, targets[k][i])
                    if perceptual is not None and i == num_steps - 2:
                        # The paper adds the batch-mean LPIPS to every element of the L1 map.
                        loss = loss + perceptual(out, targets[k][i]).mean()
                if update:
                    loss.sum().mul(1.0 / batch).backward()
            x[k] = out.detach()  # the next step starts from the student's own output, not the teacher's
            losses[i].append(loss.detach())
            if nonfinite is not None:
                nonfinite.update(loss.detach())
        if update:
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
            optimizer.step()
    return dnnlib.EasyDict(targets=targets, losses=losses)


def fall_back(mode):
    mode.fall_back_to_fp32()
    dist.print0("NaN loss under mixed precision: continuing in fp32.")


def batched_teacher(teacher, latents, labels, conds, schedule, cfg, teacher_batch):
    """Teacher targets per accumulation round, computed `teacher_batch` trajectories per call.

    Every solver step treats samples independently (DPM-Solver++'s thresholding is per sample), so regrouping
    changes nothing but speed and memory: larger calls than a round keep the GPU busy, smaller ones lower the
    teacher's peak memory.
    """
    sizes = [len(z) for z in latents]
    if all(size == teacher_batch for size in sizes):
        return [sfd_loss.teacher_trajectory(teacher, latents[k], schedule, cfg, class_labels=labels[k],
                                            condition=conds[k][0], unconditional_condition=conds[k][1])
                for k in range(len(latents))]

    def joined(parts):
        return None if parts[0] is None else torch.cat(parts)

    all_latents, all_labels = torch.cat(latents), joined(labels)
    all_cond, all_uncond = joined([c[0] for c in conds]), joined([c[1] for c in conds])
    out = []
    for start in range(0, len(all_latents), teacher_batch):
        part = slice(start, start + teacher_batch)
        out.append(sfd_loss.teacher_trajectory(
            teacher, all_latents[part], schedule, cfg, class_labels=None if all_labels is None else all_labels[part],
            condition=None if all_cond is None else all_cond[part],
            unconditional_condition=None if all_uncond is None else all_uncond[part]))
    return list(torch.cat(out, dim=1).split(sizes, dim=1))


def check_ranks_in_sync(net):
    """Every rank must hold the same weights (DDP averages gradients; any drift is a bug): compare per-tensor
    float64 sums and sums of squares across ranks and stop with an error on a mismatch."""
    if not dist.is_distributed():
        return
    with torch.no_grad():
        local = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in net.parameters()])
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    worst = max((g - gathered[0]).abs().max().item() for g in gathered)
    if worst != 0:
        raise RuntimeError(f"ranks hold different weights (max checksum difference {worst:g})")
    dist.print0(f"Ranks in sync: {dist.get_world_size()} ranks hold identical weights.")


"""SFD fine-tuning loop (paper Alg. 1): teacher trajectory, then one Adam update per student step.

Reads top to bottom as the algorithm. It never branches on the backbone: everything it needs comes from the
loaded network (shape, label_dim, σ range) and from the options (`training.config.DistillConfig`). Its units:
the teacher (`training.teacher`), the iteration (`training.sfd_iteration`), tick logging (`training.ticks`) and
resumable state (`training.state`).
"""

import os
import random
import time

import numpy as np
import torch

import dnnlib
from models import load_network, save_snapshot
from models.snapshot import SETTINGS_KEYS, SFDV_NUM_STEPS, is_sfdv
from torch_utils import cli
from torch_utils import distributed as dist
from training import sfd_iteration as iteration
from training import sfd_loss
from training import state as train_state
from training import teacher as teaching
from training.config import DistillConfig
from training.perceptual import PerceptualLoss
from training.precision import NonFiniteWatch, RunMode, maybe_compile, prepare_module
# The units' names that callers and tests reach through this module.
from training.sfd_iteration import (batched_teacher, draw_inputs, draw_sfdv_num_steps, make_optimizer,  # noqa: F401
                                    sfd_iteration)
from training.teacher import check_guidance, solver_options, split_teacher  # noqa: F401
from training.ticks import TickLog


def load_teacher(cfg, device):
    """(loaded network, TeacherConfig, use_step_condition, guidance_type) for a DistillConfig; rank 0 loads first so
    that only it downloads, and a failure on one rank stops every rank."""
    def load():
        loaded = load_network(**teaching.network_request(cfg), device=device)
        return (loaded, *teaching.teacher_setup(loaded, cfg))

    return dist.rank0_first(load)


def training_loop(run_dir=None, resume_state=None, progress=True, loaded=None, **options):
    """Distil with `options`, the fields of DistillConfig (train.py's options, with train.py's defaults).

    run_dir: the run's folder (made by the caller), or None to write nothing; only rank 0 writes. resume_state: a
    training-state dump of that run to continue from. loaded: what `load_teacher` returned, when the caller loaded
    the network first (train.py does, so that a network that fails to load leaves no run folder behind).
    """
    cfg = DistillConfig(**options)
    device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
    start_time = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = run_dir if rank == 0 else None
    batch_gpu, num_rounds = cfg.batch_geometry(world)  # batch = batch_gpu × accumulation rounds × ranks
    np.random.seed((cfg.seed * world + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    step_rng = random.Random(cfg.seed)  # same on every rank: all ranks must draw the same SFD-v num_steps
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark

    loaded, teacher_cfg, use_step_condition, guidance_type = loaded or load_teacher(cfg, device)
    settings = dict(vars(cfg), dataset_name=loaded.dataset_name,
                    model_source=loaded.settings.get("model_source", "edm"), schedule_type=teacher_cfg.schedule_type,
                    schedule_rho=teacher_cfg.schedule_rho, sigma_min=teacher_cfg.sigma_min,
                    sigma_max=teacher_cfg.sigma_max, use_step_condition=use_step_condition,
                    sampler_tea=teacher_cfg.solver, guidance_type=guidance_type)
    settings = {k: settings[k] for k in SETTINGS_KEYS}  # what the snapshots store
    sfdv = is_sfdv(settings)  # a new student length every iteration
    if sfdv:
        settings["step_condition_range"] = list(SFDV_NUM_STEPS)
    if cfg.is_second_stage:
        settings["first_stage"] = {k: loaded.settings[k] for k in SETTINGS_KEYS if k in loaded.settings}

    net, teacher = split_teacher(loaded, freeze_step_layers=sfdv)
    mode = RunMode(cfg.precision, device, (net, teacher), armed_on_cpu=cfg.mixed_on_cpu)
    for module in (net, teacher):
        prepare_module(module, channels_last=cfg.channels_last)
    dist.print0(f"Parameters: {sum(p.numel() for p in net.parameters()):,} | batch {cfg.batch_size} = "
                f"{batch_gpu} per round × {num_rounds} rounds × {world} ranks | device {device}"
                + (f" | {dist.backend()} process group, DDP" if dist.is_distributed() else ""))
    perceptual = None
    if cfg.is_second_stage and settings["model_source"] == "edm" and cfg.lpips:
        perceptual = dist.rank0_first(lambda: PerceptualLoss(device=device, cache_root=cfg.cache_root))

    optimizer = make_optimizer(net.parameters(), cfg.lr)
    ddp = net
    teacher_fn = maybe_compile(teacher, cfg.compile)
    if dist.is_distributed():
        dist.broadcast_module(net)
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=True)
    student_fn = maybe_compile(ddp, cfg.compile)

    def distill_schedule(steps, teacher_M):
        return sfd_loss.make_distill_schedule(steps, teacher_M, teacher_cfg.sigma_min, teacher_cfg.sigma_max,
                                              teacher_cfg.schedule_type, teacher_cfg.schedule_rho, net=teacher,
                                              device=device)

    fixed_schedule = distill_schedule(cfg.num_steps, cfg.M)
    cur_nimg, cur_tick = 0, 0
    stats_file = os.path.join(run_dir, "stats.jsonl") if run_dir else None
    if resume_state is not None:
        cur_nimg, cur_tick = train_state.resume(resume_state, net, optimizer, step_rng, mode, device, run_dir,
                                                stats_file)
    dist.print0(f"Training for {cfg.total_kimg} kimg...")
    log = TickLog(SFDV_NUM_STEPS[1] if sfdv else cfg.num_steps, device, cfg.total_kimg, cur_nimg, stats_file,
                  start_time, progress and rank == 0)
    nonfinite = NonFiniteWatch(device, distributed=dist.is_distributed())  # any NaN/inf loss so far

    while True:
        # SFD-v: a fresh student length (and matching teacher density) each iteration.
        cur_steps = draw_sfdv_num_steps(step_rng) if sfdv else cfg.num_steps
        schedule = distill_schedule(cur_steps, sfd_loss.SFDV_TEACHER_M) if sfdv else fixed_schedule
        # As a tensor, not a Python int: a compiled student then runs one graph for every step count (an int is
        # a constant to torch.compile, one recompilation per value of the SFD-v range).
        step_condition = (torch.full([batch_gpu], float(cur_steps), device=device) if use_step_condition
                          else None)
        latents, labels, conds = draw_inputs(net, batch_gpu, num_rounds, device)
        result = sfd_iteration(student_fn, optimizer, teacher_fn, latents, schedule, teacher_cfg, cfg.afs,
                               labels=labels, conds=conds, step_condition=step_condition, perceptual=perceptual,
                               teacher_batch=cfg.teacher_batch or batch_gpu,
                               no_sync=ddp.no_sync if dist.is_distributed() else None, mode=mode,
                               nonfinite=nonfinite)
        log.add(result.losses)
        if mode.mixed:
            nonfinite.publish()

        # LR ÷ 10 once half of the trajectories are done (paper §4, "learning rate").
        if cur_nimg / 1000 >= 0.5 * cfg.total_kimg:
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr / 10

        cur_nimg += cfg.batch_size
        done = cur_nimg >= cfg.total_kimg * 1000
        log.advance(cur_nimg)
        if not done and cur_nimg < log.tick_start_nimg + cfg.kimg_per_tick * 1000:
            continue

        if mode.mixed and nonfinite.seen(now=True):  # the loop synchronises here anyway (stats, snapshots)
            iteration.fall_back(mode)
        log.write(cur_tick, cur_nimg, optimizer.param_groups[0]["lr"], mode)
        if (cfg.snapshot_ticks and cur_tick % cfg.snapshot_ticks == 0 and cur_tick > 0) or done:
            dist.check_ranks_in_sync(net)
            if run_dir:
                save_snapshot(os.path.join(run_dir, f"network-snapshot-{cur_nimg // 1000:06d}.safetensors"), net,
                              settings)
            dist.barrier()
        cur_tick += 1
        if cfg.state_dump_ticks and (cur_tick % cfg.state_dump_ticks == 0 or done):
            train_state.dump_state(run_dir, net, optimizer, cur_nimg, cur_tick, step_rng, mode, device)
        if done:
            break

    log.close()
    dist.print0(f"Done: {cur_nimg / 1000:g} kimg in {cli.format_time(time.time() - start_time)}.")
    return dnnlib.EasyDict(net=net, teacher=teacher, settings=settings, run_dir=run_dir, kimg=cur_nimg / 1000)

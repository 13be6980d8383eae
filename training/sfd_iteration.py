"""One SFD iteration (paper Alg. 1, design §5) and what it draws: the teacher's trajectory, batched across
accumulation rounds, then one optimizer step per student step. Also the student's optimizer and SFD-v's
per-iteration student length.
"""

import contextlib

import torch

import dnnlib
from models.snapshot import SFDV_NUM_STEPS
from torch_utils import distributed as dist
from training import sfd_loss


def draw_sfdv_num_steps(step_rng):
    """SFD-v's student num_steps for one iteration: uniform on SFDV_NUM_STEPS, both ends included."""
    return step_rng.randint(*SFDV_NUM_STEPS)


def make_optimizer(params, lr):
    """The student's optimizer (paper §4): Adam, betas (0.9, 0.999), eps 1e-8."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


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

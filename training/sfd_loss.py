"""The SFD objective (paper §3–4): match one Euler step of the student to a teacher trajectory.

The student schedule has N = num_steps points t_0 > … > t_{N-1}. The teacher runs the same schedule type with
M points inserted between neighbours, i.e. (M+1)(N-1)+1 points, so its point (M+1)k coincides with student point k.
Each student step i starts from the student's own previous output (detached) and is compared with teacher point
i+1 under an L1 distance per element.
"""

from dataclasses import dataclass

import torch

import solvers
from models.registry import EDM_SIGMA_MAX, PAPER_SIGMA_MIN
from models.snapshot import SFDV_NUM_STEPS  # noqa: F401  (the range is a fact of the snapshot format)
from training.config import DistillConfig

SFDV_TEACHER_M = 3  # SFD-v's teacher points between two student points, for every num_steps of that range


@dataclass(frozen=True)
class DistillSchedule:
    t_steps: torch.Tensor  # student time points, [num_steps]
    num_steps_teacher: int
    teacher_index: tuple  # teacher trajectory entries that line up with student points 1..N-1


def make_distill_schedule(num_steps, M, sigma_min, sigma_max, schedule_type, schedule_rho, net=None, device=None):
    t_steps = solvers.get_schedule(num_steps, sigma_min, sigma_max, device=device, schedule_type=schedule_type,
                                   schedule_rho=schedule_rho, net=net)
    num_steps_teacher = (M + 1) * (num_steps - 1) + 1
    teacher_index = tuple((M + 1) * k for k in range(1, num_steps))
    return DistillSchedule(t_steps, num_steps_teacher, teacher_index)


@dataclass
class TeacherConfig:
    """How the frozen teacher draws its trajectory."""

    solver: str = DistillConfig.sampler_tea
    schedule_type: str = DistillConfig.schedule_type
    schedule_rho: float = DistillConfig.schedule_rho
    sigma_min: float = PAPER_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX
    afs: bool = False  # first stage: off; second stage: the first-stage model's own setting
    conditioned: bool = False  # second stage from an SFD-v model: its step condition is the teacher's num_steps
    solver_options: dict = None  # the solver's own options (solvers.TABLE[solver].options)


@torch.no_grad()
def teacher_trajectory(teacher, latents, schedule, cfg, class_labels=None, condition=None,
                       unconditional_condition=None):
    """Teacher points at the student's t_1 … t_{N-1}: [N-1, B, C, H, W]. `latents` are unit Gaussian."""
    sampler = solvers.SOLVERS[cfg.solver]
    traj = sampler(
        teacher, latents, class_labels=class_labels, condition=condition,
        unconditional_condition=unconditional_condition, num_steps=schedule.num_steps_teacher,
        sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, schedule_type=cfg.schedule_type,
        schedule_rho=cfg.schedule_rho, afs=cfg.afs, denoise_to_zero=False, return_inters=True,
        step_condition=schedule.num_steps_teacher if cfg.conditioned else None, **(cfg.solver_options or {}),
    )
    # Integer indexing only: a list index would be copied to the device, a host-device sync on CUDA.
    return torch.stack([traj[k] for k in schedule.teacher_index])


def student_step(net, x, schedule, i, afs, class_labels=None, condition=None, unconditional_condition=None,
                 step_condition=None):
    """One Euler step of the student from t_i to t_{i+1}; AFS replaces the network at i = 0."""
    t = schedule.t_steps
    return solvers.euler_step(net, x, t[i], t[i + 1], class_labels=class_labels, condition=condition,
                              unconditional_condition=unconditional_condition, step_condition=step_condition,
                              afs=bool(afs and i == 0))


def l1_loss(student_out, teacher_out):
    """Per-element L1 distance (paper Eq. 8); reduced by the caller as sum / batch."""
    return (student_out - teacher_out).abs()


"""One distillation run's options: their names, their defaults and their checks, written once (design §5).

train.py's options, `training_loop(**options)` and the experiments all read `DistillConfig`, so a run started from
Python distils exactly as `train.py` does with the same options. Its fields are the keys of a run's
`training_options.json` (besides world_size, which only records the run).

Every check of an option that needs no network happens in `DistillConfig.__post_init__` (and `batch_geometry`
for the number of ranks); a bad option is an `OptionError` that names it, which train.py turns into its one-line
refusal.
"""

import dataclasses
import os
from typing import Optional

import solvers
from training.precision import PRECISIONS


class OptionError(ValueError):
    """A bad option: `option` is the DistillConfig field, the message says what is wrong with it."""

    def __init__(self, option, message):
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    # What is distilled.
    dataset_name: Optional[str] = None      # a row of models.BACKBONES
    model_path: Optional[str] = None        # an EDM-format pickle, a latent checkpoint, or a first-stage snapshot
    is_second_stage: bool = False
    use_step_condition: bool = False        # SFD-v
    num_steps: int = 4                      # student time points
    M: int = 3                              # teacher points inserted between neighbouring student points
    afs: bool = True
    sampler_tea: str = "dpmpp"
    max_order: Optional[int] = None         # None: the teacher solver's own default (solvers.TABLE)
    predict_x0: bool = True
    # The DPM-Solver++ teacher runs without dynamic thresholding: the paper's fp16 teachers skipped it (design §4;
    # sampling keeps it on: solvers.dpm_solver_pp.SAMPLING_THRESHOLDING).
    thresholding: bool = False
    lower_order_final: bool = True
    schedule_type: str = "polynomial"
    schedule_rho: float = 7.0
    guidance_type: Optional[str] = None     # LDM: 'uncond', Stable Diffusion: 'cfg'
    guidance_rate: float = 0.0              # classifier-free guidance weight that sampling uses
    lpips: bool = True                      # second stage, EDM backbones: LPIPS on the last step
    # How long, how much per iteration.
    batch_size: int = 128                   # trajectories per iteration over all ranks
    batch_gpu: Optional[int] = None         # per rank and accumulation round; None: batch_size / ranks
    total_kimg: float = 200
    lr: float = 5e-5
    seed: int = 0
    # Logging and files.
    kimg_per_tick: float = 1
    snapshot_ticks: Optional[int] = None    # None: one snapshot at the end
    state_dump_ticks: Optional[int] = None  # None: no resumable dumps
    cache_root: str = "./src"
    # Where and how fast (the same numbers either way, design §5).
    device: Optional[str] = None            # None: the CPU
    precision: str = "fp16"                 # 'fp16' (EDM's use_fp16, the paper), 'bf16' or 'fp32'; mixed on CUDA only
    mixed_on_cpu: bool = False              # arm fp16/bf16 on the CPU too (tests of the mixed-precision path)
    channels_last: bool = False
    compile: object = False                 # torch.compile the teacher and student calls (True or a mode/backend)
    teacher_batch: Optional[int] = None     # teacher trajectories per call; None: batch_gpu
    cudnn_benchmark: bool = True

    def __post_init__(self):
        if self.num_steps < 2:
            raise OptionError("num_steps", "needs at least 2 time points (1 step)")
        if self.afs and self.num_steps < 3:
            raise OptionError("num_steps", (
                "the second stage needs num_steps >= 3 with AFS (1 NFE)" if self.is_second_stage else
                f"num_steps={self.num_steps} with --afs=True leaves no network call to train; use --num_steps >= 3 "
                "or --afs=False"))
        if self.M < 0:
            raise OptionError("M", f"must be >= 0, got {self.M}")
        if self.sampler_tea not in solvers.TABLE:
            raise OptionError("sampler_tea", f"unknown solver {self.sampler_tea!r}; choose one of "
                                             f"{', '.join(solvers.TABLE)}")
        try:
            solvers.TABLE[self.sampler_tea].check_max_order(self.max_order, optional=True)
        except ValueError as e:
            raise OptionError("max_order", str(e)) from None
        if self.schedule_type not in solvers.SCHEDULE_TYPES:
            raise OptionError("schedule_type", f"unknown schedule {self.schedule_type!r}; choose one of "
                                               f"{', '.join(solvers.SCHEDULE_TYPES)}")
        if self.is_second_stage and not self.model_path:
            raise OptionError("model_path", "the second stage needs --model_path=<a first-stage SFD or SFD-v snapshot>")
        if not self.is_second_stage and not self.dataset_name and not self.model_path:
            raise OptionError("dataset_name", "give --dataset_name (a built-in backbone) or --model_path (an EDM-format "
                                              ".pkl)")
        if self.model_path and "://" in self.model_path:
            raise OptionError("model_path", f"{self.model_path} is a URL; download the file and pass its local path")
        if self.model_path and not os.path.exists(self.model_path):
            raise OptionError("model_path", f"no such file: {self.model_path}")
        if self.guidance_type == "cfg" and self.guidance_rate <= 0:
            raise OptionError("guidance_rate", "classifier-free guidance needs --guidance_rate > 0")
        if self.guidance_rate != 0 and self.guidance_type != "cfg":
            raise OptionError("guidance_rate", f"{self.guidance_rate:g} is a classifier-free guidance weight: it needs "
                                               "--guidance_type=cfg (Stable Diffusion), or drop it")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "total_kimg", "lr", "kimg_per_tick"):
            if not getattr(self, name) > 0:
                raise OptionError(name, f"must be > 0, got {getattr(self, name)}")

    def batch_geometry(self, world_size):
        """(per-round batch, accumulation rounds): batch_size = batch_gpu × rounds × ranks, or an OptionError."""
        batch_per_rank = self.batch_size // world_size
        batch_gpu = self.batch_gpu or batch_per_rank
        if self.batch_size % world_size != 0 or batch_gpu == 0 or batch_per_rank % batch_gpu != 0:
            raise OptionError("batch_size", f"--batch={self.batch_size} must be divisible by ranks ({world_size}) × "
                                            f"--batch-gpu ({batch_gpu})")
        return batch_gpu, batch_per_rank // batch_gpu

    @property
    def is_sfdv(self):
        from models.snapshot import is_sfdv

        return is_sfdv(dataclasses.asdict(self))


# The option names; each one's default is the class attribute, e.g. DistillConfig.thresholding.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(DistillConfig))

"""How the teacher and student networks run on the device: the speed switches of the training loop.

- precision 'fp16': EDM's own `use_fp16` (the U-Net casts its activations to float16) — what the paper runs.
- precision 'bf16': torch.autocast to bfloat16 around every network call (no loss scaling needed).
- precision 'fp32': plain float32, the reference path.
Mixed precision is only armed on CUDA (or when a test forces it). A non-finite loss switches the run to fp32
for good (design §5). `channels_last` and `compile` change how the same numbers are computed, not which.
"""

import contextlib

import torch

PRECISIONS = ("fp16", "bf16", "fp32")


def full_fp32():
    """fp32 means fp32: no TF32 in CUDA matmuls or convolutions (as EDM and the paper set it for training). PyTorch
    leaves TF32 on for cuDNN convolutions by default, so the training loop, sample.py and every experiment script
    whose rows are compared across machines call this first."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def precision_that_runs(precision, device, armed_on_cpu=False):
    """The precision a run on `device` uses when asked for `precision`: mixed precision is armed on CUDA only (or
    when a test forces it on the CPU), everything else runs fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision if torch.device(device).type == "cuda" or armed_on_cpu else "fp32"


class RunMode:
    def __init__(self, precision, device, modules, armed_on_cpu=False):
        self.device = device
        self.modules = list(modules)
        full_fp32()  # the fp32 fallback after a NaN and the fp32 baseline of the equivalence check rely on it
        self.precision = precision_that_runs(precision, device, armed_on_cpu)
        self._apply()

    @property
    def mixed(self):
        return self.precision != "fp32"

    def _apply(self):
        for module in self.modules:
            if hasattr(module, "use_fp16"):
                module.use_fp16 = self.precision == "fp16"

    def autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def fall_back_to_fp32(self):
        self.precision = "fp32"
        self._apply()


class NonFiniteWatch:
    """Notices a NaN/inf loss without stalling the device.

    `update` folds each loss into a flag on the device. On CUDA, `publish` (end of an iteration) copies the flag to
    pinned host memory behind an event, and `seen` (called after the next iteration's teacher work is queued)
    waits only for that event, so the GPU keeps working while the host reads the flag: one iteration of lag and no
    pipeline drain. Elsewhere `seen` reads the flag directly. `seen(now=True)` reads the current flag (tick
    boundaries, where the loop synchronises anyway). Under torch.distributed the flag is OR-ed over ranks so that
    every rank falls back together.
    """

    def __init__(self, device, distributed=False):
        self.flag = torch.zeros([], dtype=torch.int32, device=device)
        self.distributed = distributed
        self.lagged = device.type == "cuda"
        if self.lagged:
            self.host = torch.zeros([], dtype=torch.int32).pin_memory()
            self.event = torch.cuda.Event()
            self.published = False

    def update(self, loss):
        self.flag |= (~torch.isfinite(loss).all()).to(torch.int32)

    def publish(self):
        if self.distributed:
            torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX)
        if self.lagged:
            self.host.copy_(self.flag, non_blocking=True)
            self.event.record()
            self.published = True

    def seen(self, now=False):
        if self.lagged and not now:
            if not self.published:
                return False
            self.event.synchronize()
            return bool(self.host.item())
        return bool(self.flag.item())


def prepare_module(module, channels_last=False):
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def maybe_compile(fn, enabled):
    """torch.compile a callable network (the module itself stays the one that is saved and synced).

    `enabled` may name a torch.compile mode of the inductor backend (e.g. 'reduce-overhead': CUDA graphs) or
    another backend (e.g. 'aot_eager', which the CPU tests use to trace the same graphs without generating
    kernels); True means the default backend (inductor) in its default mode.
    """
    if not enabled:
        return fn
    if enabled in COMPILE_MODES:
        return torch.compile(fn, dynamic=False, mode=enabled)
    backend = enabled if isinstance(enabled, str) else "inductor"
    return torch.compile(fn, dynamic=False, backend=backend)

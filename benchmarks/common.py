"""What the benchmark scripts share: networks to time, device-timeline stopwatches, the report format."""

import json
import os
import platform
import resource
import time

import torch

# The fast paths: what bench_train.py and bench_sample.py time with --fast, and what check_equivalence.py compares
# with fp32 by default. Training: training_loop keywords (train.py's switches); sampling: sample.py's switches.
FAST_TRAIN = dict(precision="bf16", channels_last=True, compile=True)
FAST_SAMPLE = dict(precision="fp16", channels_last=True, compile=True)

# A SongUNet small enough for CPU runs of every benchmark (3 channels so the PNG path is the RGB one).
TINY_EDM = dict(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, augment_dim=0)


def as_pairs(options):
    """NAME=VALUE strings (VALUE as JSON) of a keyword dict, the form --loop_kwarg and --fast take."""
    return tuple(f"{k}={json.dumps(v)}" for k, v in options.items())


def pick_device(name):
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_edm(tiny, use_step_condition=False, seed=0):
    """EDMPrecond with random weights: the cifar10 architecture of the backbone table, or TINY_EDM."""
    from models import BACKBONES, EDMPrecond

    kwargs = dict(TINY_EDM) if tiny else BACKBONES["cifar10"].interface_kwargs()
    torch.manual_seed(seed)
    return EDMPrecond(**kwargs, use_step_condition=use_step_condition).eval().requires_grad_(False)


def num_params(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def forward_flops(fn, batch):
    """FLOPs per image of one call `fn()` that processes `batch` images (torch's FlopCounterMode:
    matmuls and convolutions, 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


class Stopwatch:
    """Marks on the device timeline: CUDA events (no host synchronisation while the work runs) or the
    host clock on a CPU. `seconds(a, b)` is valid once `sync()` has returned."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start, end):
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    """Device, library versions and the numeric modes that change throughput."""
    env = dict(device=str(device), torch=torch.__version__, python=platform.python_version())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_mem_gb=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        env.update(device_name=cpu_name(), cpu_threads=torch.get_num_threads())
    return env


def peak_memory_gb(device):
    """CUDA max_memory_allocated, or the process's max RSS on a CPU; GB = 2**30 bytes as EDM logs it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def report(result, json_path=None):
    """Print the human-readable summary, then the result as one JSON line (appended to json_path too)."""
    settings = result.get("settings", {})
    env = result.get("env", {})
    print(f"[{result['bench']}] {env.get('device_name')} ({env.get('device')}) | torch {env.get('torch')}"
          + (f" | CUDA {env['cuda']} cuDNN {env['cudnn']}" if env.get("cuda") else ""))
    print(f"[{result['bench']}] settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for line in result.get("summary", []):
        print(f"[{result['bench']}] {line}")
    line = json.dumps({k: v for k, v in result.items() if k != "summary"}, sort_keys=False)
    print(line, flush=True)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "a") as f:
            f.write(line + "\n")

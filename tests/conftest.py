import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests import diffusers themselves (reference models): torchvision must import first, as models/latent makes it.
from torch_utils.torchvision_compat import allow_import  # noqa: E402

allow_import()

# Tests never reach the network: downloads must fail fast and clearly.
os.environ.setdefault("SFD_OFFLINE", "1")
torch.set_num_threads(1)  # tiny test convolutions run fastest single-threaded on shared cores
# ...and so do the scripts the tests start; it also keeps train.py from measuring the machine's load every run
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


# Tests of CUDA paths run the same calls on the CPU too: parametrise over DEVICES, and keep only the assertions
# that need CUDA (sync-debug mode, float16 kernels, CUDA events) under `if device == "cuda"`.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def assert_one_line_refusal(result, *words):
    """A CLI's refusal of bad input: exit code 2, no traceback, and a single error line holding `words`; before it,
    at most click's usage hint ('Usage: ...', 'Try ... --help ...') that click prints with a usage error. Returns
    the error line."""
    out = result.output
    assert result.exit_code == 2, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out and "Aborted" not in out, out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), out
    assert all(line.startswith(("Usage: ", "Try '")) for line in lines[:-1]), out
    assert all(w in lines[-1] for w in words), (words, out)
    return lines[-1]


def tree(folder):
    """Every file and folder under `folder`, with file sizes: equal before and after means nothing was written."""
    found = set()
    for root, dirs, files in os.walk(folder):
        found.update(os.path.relpath(os.path.join(root, d), folder) + "/" for d in dirs)
        found.update((os.path.relpath(os.path.join(root, f), folder), os.path.getsize(os.path.join(root, f)))
                     for f in files)
    return found


def convolution_dtypes(fn):
    """Run `fn()` and return (its result, the set of input dtypes of every convolution it ran), as the kernels see
    them (after autocast)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.convolution:
                seen.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Spy():
        out = fn()
    return out, seen


TINY_SONG = dict(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet", model_channels=16,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, augment_dim=0)
TINY_DHARIWAL = dict(img_resolution=8, img_channels=3, label_dim=4, model_type="DhariwalUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


# 16x16 RGB networks with every option of EDM's CIFAR-10 configurations named (model, pickle and loader tests).
SONG_16 = dict(img_resolution=16, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[8], dropout=0, augment_dim=9, embedding_type="positional",
               encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])
ADM_16 = dict(img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet", model_channels=32,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0)


def perturbed(net, seed=0, scale=0.05):
    """EDM zero-initialises output layers; jitter every weight so each one influences D(x). Returns net in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def tiny_net(cls=None, seed=0, **kwargs):
    """cls(**kwargs) (default EDMPrecond) with seeded random weights, every one of them perturbed."""
    if cls is None:
        from models import EDMPrecond as cls
    torch.manual_seed(seed)
    return perturbed(cls(**kwargs), seed)


def build_tiny_edm(seed=0, **overrides):
    """A tiny EDMPrecond with random weights (deterministic for a seed)."""
    from models import EDMPrecond

    kwargs = dict(TINY_SONG, **overrides)
    torch.manual_seed(seed)
    return EDMPrecond(**kwargs)


def write_edm_pickle(path, net):
    """A genuine EDM-format training snapshot holding `net` under 'ema'."""
    from torch_utils.persistence import save_edm_pickle

    save_edm_pickle(str(path), {"ema": net})
    return str(path)


@pytest.fixture(scope="session")
def tiny_teacher_pkl(tmp_path_factory):
    """Path of a tiny unconditional 1-channel 8×8 EDM teacher pickle, and the network it holds."""
    net = build_tiny_edm(seed=0)
    path = tmp_path_factory.mktemp("teacher") / "tiny-edm.pkl"
    return write_edm_pickle(path, net), net


@pytest.fixture(scope="session")
def tiny_cond_teacher_pkl(tmp_path_factory):
    """A tiny class-conditional (4 classes) 3-channel DhariwalUNet teacher pickle."""
    net = build_tiny_edm(seed=1, **TINY_DHARIWAL)
    path = tmp_path_factory.mktemp("teacher") / "tiny-edm-cond.pkl"
    return write_edm_pickle(path, net), net


def run_loop(pkl, **kw):
    """training_loop() from Python on the CPU: the tiny teacher `pkl`, batch 4, one iteration (0.004 kimg), seed 3,
    fp32, no progress bar, unless `kw` says otherwise. Makes `run_dir` first, as train.py does."""
    from training.training_loop import training_loop

    args = dict(model_path=pkl, batch_size=4, total_kimg=0.004, seed=3, device="cpu", progress=False, precision="fp32")
    args.update(kw)
    if args.get("run_dir"):
        os.makedirs(args["run_dir"], exist_ok=True)
    return training_loop(**args)


def torchrun(script, *args, nproc=2, cwd=ROOT, timeout=300):
    """`torchrun --standalone --nproc_per_node=nproc script args` on the CPU (gloo), offline, one thread per process:
    the finished subprocess, its output as text. `script` is relative to the repository."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *args]
    env = dict(os.environ, SFD_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def documented_defaults(command, *names):
    """{'--option': text} of the '[default: text]' that `--help` shows for each option of a click command (the
    subcommand `names` of a group): what a user reads, to compare with what a run without the option passes on."""
    import re

    import click

    for name in names:
        command = command.commands[name]
    ctx = click.Context(command, info_name=command.name)
    found = {}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        match = re.search(r"\[default: ([^\]]+)\]", " ".join(record[1].split()))
        if match:  # click appends an option's range to its default: '[default: 5; x>=1]'
            found[param.opts[0]] = re.sub(r"; [^;]*[<>=].*$", "", match.group(1))
    return found


class CallRecorder:
    """Wraps functions a CLI calls (monkeypatched on its module) and keeps the arguments each call received, bound
    to the function's own parameter names; `replace` answers instead of the real function."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.calls = {}

    def wrap(self, module, name, replace=None):
        import functools
        import inspect

        real = getattr(module, name)
        signature = inspect.signature(real)  # follows __wrapped__: a function wrapped twice binds its own names
        calls = self.calls.setdefault(name, [])

        @functools.wraps(real)
        def recording(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            calls.append(dict(bound.arguments))
            return (replace or real)(*args, **kwargs)

        self.monkeypatch.setattr(module, name, recording)
        return calls

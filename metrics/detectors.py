"""Feature detectors for FID/PRDC and how they are loaded.

A detector is any callable ``det(images, return_features=True) -> features [N, D]`` taking uint8
NCHW images in [0, 255] (it resizes and normalises them itself, as NVIDIA's Inception does).

Channel rule: a detector declares the channel count it takes with an integer attribute
``in_channels`` (for a TorchScript file: an ``int`` attribute of the top-level module, kept by
``torch.jit.script``; ``torch.jit.trace`` drops such attributes). Without it, 3 is assumed. Grayscale images (C = 1) are repeated to 3 channels before the call
unless the detector declares ``in_channels == 1``; any other mismatch is an error.

``load_detector(spec)`` accepts
  * ``None``: NVIDIA's Inception-v3 port ``inception-2015-12-05.pkl`` (2048-d pool features, the
    detector of EDM and of the SFD paper), downloaded once into ``{cache_root}/metrics/``;
  * a TorchScript file ``.pt/.pth/.ts/.jit`` (``torch.jit.save``), loaded with ``torch.jit.load``,
    which runs no Python code from the file;
  * a ``.pkl`` of the NVIDIA kind (see ``load_nvidia_pickle``);
  * an http(s) URL of either kind, downloaded once into ``{cache_root}/metrics/``.

NVIDIA's pickles are read with a restricted unpickler that only rebuilds tensors, standard
``torch.nn`` modules and plain containers; any other global is refused. If the pickle carries a
TorchScript archive, that archive is loaded with ``torch.jit.load``. If it carries Python source
(stylegan3/EDM ``torch_utils.persistence`` format: the class's module source travels in the file and
must be executed to rebuild the object), that source is executed only when trusted: by default for
the built-in NVIDIA URL, which EDM and the paper load with plain ``pickle.load``, and never for
other files unless ``trust_embedded_code=True``.
"""

import contextlib
import hashlib
import io
import os
import pickle
import sys
import types
import warnings
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils.persistence import EDM_PICKLE_RULES, PersistentRecord
from torch_utils.restricted_pickle import RestrictedUnpickler

DEFAULT_DETECTOR_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"
)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")


# ----------------------------------------------------------------------------------------------
# Calling a detector


def detector_in_channels(detector):
    """Channels the detector takes: its integer attribute ``in_channels``, else 3."""
    try:
        c = getattr(detector, "in_channels")
    except (AttributeError, RuntimeError):
        return 3
    return int(c) if isinstance(c, (int, np.integer)) and not isinstance(c, bool) else 3


def match_channels(images, in_channels):
    """Repeat grayscale to RGB for a 3-channel detector; refuse other mismatches."""
    c = images.shape[1]
    if c == in_channels:
        return images
    if c == 1 and in_channels == 3:
        return images.repeat([1, 3, 1, 1])
    raise ValueError(f"the detector takes {in_channels}-channel images but the images have {c} channels")


@torch.no_grad()
def compute_features(detector, images, device="cpu"):
    """Features [N, D] in float64 of a uint8 NCHW batch (tensor or numpy array)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {list(images.shape)}")
    # A fixed (contiguous NCHW) layout keeps results independent of how the caller built the batch.
    images = match_channels(images.to(device).contiguous(), detector_in_channels(detector))
    features = detector(images, return_features=True)
    return features.reshape(images.shape[0], -1).to(torch.float64)


# ----------------------------------------------------------------------------------------------
# Loading


def load_detector(spec=None, device="cpu", cache_root="./src", trust_embedded_code=None):
    """The detector named by ``spec`` (see the module docstring), in eval mode on ``device``.

    Raises ``dnnlib.util.DownloadError`` (naming file, URL and folder) when a URL is neither cached
    nor downloadable, and ValueError for a missing or unreadable file.
    """
    cache_dir = os.path.join(cache_root, "metrics")
    is_default = spec is None or spec == DEFAULT_DETECTOR_URL
    if is_default:
        spec = DEFAULT_DETECTOR_URL
    if trust_embedded_code is None:
        trust_embedded_code = is_default
    spec = str(spec)
    path = dnnlib.util.download_file(spec, cache_dir) if "://" in spec else spec
    if not os.path.isfile(path):
        raise ValueError(f"detector {spec}: no such file")
    if detector_format(path, spec) == "torchscript":
        net = load_torchscript(path, device)
    else:
        net = load_nvidia_pickle(path, trust_embedded_code=trust_embedded_code)
    if isinstance(net, torch.nn.Module):
        net = net.eval().to(device)  # features are computed under no_grad; ScriptModules lack requires_grad_
    return net


def detector_format(path, spec=None):
    """'torchscript' or 'pickle', by the file name's suffix; ValueError for any other name. Reads nothing, so a
    command can refuse a wrong --detector before it starts."""
    lower = str(path).lower()
    if lower.endswith(TORCHSCRIPT_SUFFIXES):
        return "torchscript"
    if lower.endswith(".pkl"):
        return "pickle"
    raise ValueError(
        f"detector {spec or path}: unknown format; expected a TorchScript file ({'/'.join(TORCHSCRIPT_SUFFIXES)}) "
        f"or an NVIDIA .pkl"
    )


def load_torchscript(path_or_bytes, device="cpu"):
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 flags TorchScript as deprecated; loading is still supported and is the
            # format that runs no Python code from the file.
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(src, map_location=torch.device(device))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = path_or_bytes if isinstance(path_or_bytes, str) else "embedded archive"
        raise ValueError(f"detector {name} is not a TorchScript archive saved with torch.jit.save ({first})") from None


def _torch_nn_class(module, name):
    """Detector pickles may hold plain torch.nn layers; those classes (and nothing else) are built for real."""
    if module.startswith("torch.nn.modules."):
        cls = getattr(sys.modules.get(module) or _import(module), name, None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            return cls
    return None


def _import(module):
    import importlib

    return importlib.import_module(module)


def load_nvidia_pickle(path, trust_embedded_code=False):
    """Rebuild a detector from an NVIDIA metrics pickle without unrestricted unpickling."""
    with open(path, "rb") as f:
        try:
            shown = str(path).replace("{", "{{").replace("}", "}}")
            obj = RestrictedUnpickler(f, allowed=EDM_PICKLE_RULES["allowed"], resolve=_torch_nn_class,
                                      refusal=f"{shown} refers to {{name}}, which the detector loader does not allow; "
                                              f"use a TorchScript detector (--detector model.pt) instead").load()
        except pickle.UnpicklingError as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # truncated or foreign files
            raise ValueError(f"detector {path} is not a readable pickle ({type(e).__name__}: {e})") from None
    archive = _find_torchscript_archive(obj)
    if archive is not None:
        return load_torchscript(archive)
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, PersistentRecord):
        if not trust_embedded_code:
            raise ValueError(
                f"detector {path} embeds Python source (class {obj.class_name!r}) that must run to "
                f"rebuild it; refusing to run it: convert the detector to TorchScript (torch.jit.save) or load "
                f"it with trust_embedded_code=True"
            )
        return _materialize(obj, {})
    raise ValueError(f"detector {path} holds a {type(obj).__name__}, not a network")


def _find_torchscript_archive(obj, depth=0):
    """Bytes of a TorchScript zip archive anywhere in a small unpickled tree, else None."""
    if depth > 6:
        return None
    if isinstance(obj, (bytes, bytearray)):
        if obj[:4] == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(io.BytesIO(obj)) as z:
                    if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
                        return bytes(obj)
            except zipfile.BadZipFile:
                return None
        return None
    if isinstance(obj, PersistentRecord):
        return _find_torchscript_archive(obj.state, depth + 1)
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        return None
    for v in items:
        found = _find_torchscript_archive(v, depth + 1)
        if found is not None:
            return found
    return None


# --- running the embedded source of a persistence pickle (trusted files only) -------------------


def _identity_decorator(cls):
    return cls


@contextlib.contextmanager
def _persistence_stub():
    """While the embedded source runs, ``torch_utils.persistence`` is a stub whose decorator leaves
    classes unchanged: re-pickling is not needed, and EDM's real decorator would look for the source
    file of a module that only exists in memory."""
    stub = types.ModuleType("torch_utils.persistence")
    stub.persistent_class = _identity_decorator
    stub.is_persistent = lambda obj: False
    stub.import_hook = lambda hook: hook
    import torch_utils

    saved_module = sys.modules.get("torch_utils.persistence")
    had_attr = hasattr(torch_utils, "persistence")
    saved_attr = getattr(torch_utils, "persistence", None)
    sys.modules["torch_utils.persistence"] = stub
    torch_utils.persistence = stub
    try:
        yield
    finally:
        if saved_module is None:
            sys.modules.pop("torch_utils.persistence", None)
        else:
            sys.modules["torch_utils.persistence"] = saved_module
        if had_attr:
            torch_utils.persistence = saved_attr
        else:
            delattr(torch_utils, "persistence")


_embedded_modules = {}  # sha256 of source -> module, so one source runs once per process


def _module_from_source(src):
    key = hashlib.sha256(src.encode("utf-8")).hexdigest()
    if key not in _embedded_modules:
        name = f"_sfd_embedded_{key[:16]}"
        module = types.ModuleType(name)
        sys.modules[name] = module
        try:
            with _persistence_stub():
                exec(compile(src, f"<detector source {key[:16]}>", "exec"), module.__dict__)
        except ImportError as e:
            sys.modules.pop(name, None)
            raise ValueError(f"the detector's embedded source needs module {e.name!r}, which is not installed") from None
        _embedded_modules[key] = module
    return _embedded_modules[key]


def _materialize(obj, memo):
    """Replace inert persistent records by real objects, innermost first (as pickle would)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, PersistentRecord):
        state = dict(obj.state)
        if obj.init_args is not None:
            state["_init_args"] = obj.init_args
        if obj.init_kwargs is not None:
            state["_init_kwargs"] = obj.init_kwargs
        state = _materialize(state, memo)
        cls = _module_from_source(obj.module_src).__dict__[obj.class_name]
        inst = cls.__new__(cls)
        setstate = getattr(inst, "__setstate__", None)
        if callable(setstate):
            setstate(dnnlib.EasyDict(state))
        else:
            inst.__dict__.update(state)
        memo[id(obj)] = inst
        return inst
    memo[id(obj)] = obj
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _materialize(obj[k], memo)
    elif isinstance(obj, list):
        obj[:] = [_materialize(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        new = tuple(_materialize(v, memo) for v in obj)
        memo[id(obj)] = new
        return new
    elif isinstance(obj, torch.nn.Module):
        for d in (obj._modules, obj.__dict__):
            for k in list(d):
                if isinstance(d[k], (PersistentRecord, dict, list, tuple)):
                    d[k] = _materialize(d[k], memo)
    return obj


# ----------------------------------------------------------------------------------------------
# Features of an image folder, this rank's share


def iterate_features(detector, images, batch_size, device="cpu", rank=0, world_size=1, num_workers=0, progress=False):
    """Yield float64 features [n, D] of this rank's batches of ``images`` (a metrics.images.ImageFiles)."""
    from .images import iterate_images

    batches = iterate_images(images, batch_size, rank=rank, world_size=world_size, num_workers=num_workers)
    if progress:
        import tqdm

        total = -(-len(images) // (batch_size * world_size))
        batches = tqdm.tqdm(batches, total=total, unit="batch", leave=False)
    for x in batches:
        yield compute_features(detector, x, device)


def load_detector_rank0_first(spec=None, device="cpu", cache_root="./src"):
    """load_detector on every rank, rank 0 first so that only it downloads into the cache."""
    from torch_utils import distributed as dist

    return dist.rank0_first(lambda: load_detector(spec, device=device, cache_root=cache_root))


def one_line(err):
    """A one-line message for an exception, unwrapping DataLoader worker tracebacks."""
    lines = [l for l in str(err).strip().splitlines() if l.strip()] or [type(err).__name__]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]

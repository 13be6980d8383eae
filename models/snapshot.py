"""Our network snapshot format: ONE `.safetensors` file, no pickled code.

The file holds the denoiser's state_dict and, in the safetensors metadata (string -> string):

    format        'sfd-snapshot'
    version       '1'
    architecture  JSON {"class": "EDMPrecond", "init_kwargs": {...}}  -> rebuilds the network
    settings      JSON dict of everything sampling needs (design §5: dataset_name, num_steps, afs, ...)

Reading it builds the class named in `architecture` from `NETWORK_CLASSES` (never from a name that is not
in the table) and loads the tensors strictly, so no code from the file can run.
"""

import json

import torch

import dnnlib

from .precond import EDM_PRECOND_CLASSES

FORMAT_NAME = "sfd-snapshot"
FORMAT_VERSION = "1"

# The settings a distilled snapshot stores (design §5): everything sampling needs, and how it was distilled. A
# second-stage snapshot also stores its first stage's under "first_stage"; an SFD-v one its "step_condition_range".
SETTINGS_KEYS = (
    "dataset_name", "model_source", "num_steps", "M", "afs", "schedule_type", "schedule_rho", "sigma_min",
    "sigma_max", "use_step_condition", "sampler_tea", "max_order", "predict_x0", "lower_order_final", "thresholding",
    "is_second_stage", "guidance_type", "guidance_rate",
)

SFDV_NUM_STEPS = (4, 7)  # SFD-v draws the student's num_steps uniformly from this range (both ends) each iteration


def is_sfdv(settings):
    """An SFD-v model (one model for every num_steps of its range): step-conditioned and not a second stage, whose
    step condition is its single num_steps."""
    return bool(settings.get("use_step_condition")) and not settings.get("is_second_stage")


# Class name stored in a snapshot -> class. Other backbones add themselves with `register_network_class`.
NETWORK_CLASSES = dict(EDM_PRECOND_CLASSES)


def register_network_class(cls):
    """Let snapshots name `cls` (a module whose `init_kwargs` rebuild it). Usable as a class decorator."""
    NETWORK_CLASSES[cls.__name__] = cls
    return cls


def save_snapshot(path, net, settings):
    """Write `net` and `settings` to `path` atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file

    name = type(net).__name__
    if NETWORK_CLASSES.get(name) is not type(net):
        raise ValueError(f"save_snapshot: {name} is not in models.snapshot.NETWORK_CLASSES; register it with register_network_class")
    if not isinstance(settings, dict):
        raise ValueError("save_snapshot: settings must be a dict")
    try:
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "architecture": json.dumps({"class": name, "init_kwargs": net.init_kwargs}),
            "settings": json.dumps(settings),
        }
    except TypeError as e:
        raise ValueError(f"save_snapshot: settings and init_kwargs must be JSON-serialisable ({e})") from None
    tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in net.state_dict().items()}

    with dnnlib.util.atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_snapshot_metadata(path):
    """(architecture dict, settings dict) of a snapshot file without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} is not a readable SFD snapshot (.safetensors): {type(e).__name__}: {e}") from None
    return _parse_metadata(path, metadata)


def _parse_metadata(path, metadata):
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is a safetensors file but not an SFD snapshot (metadata format={metadata.get('format')!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: SFD snapshot version {metadata.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    try:
        architecture = json.loads(metadata["architecture"])
        settings = json.loads(metadata["settings"])
        class_name, init_kwargs = architecture["class"], architecture["init_kwargs"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: damaged SFD snapshot metadata ({type(e).__name__}: {e})") from None
    if class_name not in NETWORK_CLASSES:
        raise ValueError(f"{path}: snapshot network class {class_name!r} is unknown; known: {', '.join(NETWORK_CLASSES)}")
    if not isinstance(init_kwargs, dict) or not isinstance(settings, dict):
        raise ValueError(f"{path}: damaged SFD snapshot metadata (init_kwargs and settings must be dicts)")
    return architecture, settings


def load_snapshot(path, device="cpu"):
    """(net, settings) from a snapshot written by `save_snapshot`: eval mode, no gradients, float32."""
    from safetensors.torch import load_file

    architecture, settings = read_snapshot_metadata(path)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as e:
        raise ValueError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from None
    cls = NETWORK_CLASSES[architecture["class"]]
    with torch.random.fork_rng(devices=[]):  # building draws random init; keep the caller's RNG stream intact
        try:
            net = cls(**architecture["init_kwargs"])
        except TypeError as e:
            raise ValueError(f"{path}: cannot rebuild {architecture['class']} from its stored init_kwargs ({e})") from None
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # torch lists the keys over several lines; commands print one line
        raise ValueError(f"{path}: stored tensors do not match {architecture['class']}: {' '.join(str(e).split())}") from None
    return net.to(device).float().eval().requires_grad_(False), settings

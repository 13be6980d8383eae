"""The one way to get a network: `load_network(dataset_name=..., model_path=...)`.

    load_network('cifar10')                          EDM's checkpoint from the table, downloaded once
    load_network(model_path='my-edm-net.pkl')        any EDM-format network pickle (architecture from the file)
    load_network(model_path='exps/.../network-snapshot-000200.safetensors')   an SFD snapshot + its settings

Nothing from a file is executed: EDM pickles go through torch_utils.persistence's restricted reader and
snapshots are safetensors. The returned network is float32, in eval mode, without gradients, on `device`.
"""

import json
import os
import re
from dataclasses import dataclass

import torch

import dnnlib
from torch_utils import persistence
from torch_utils.restricted_pickle import InertObject

from .edm import load_state_strict
from .precond import EDM_PRECOND_CLASSES
from .registry import BACKBONES, EDM_SIGMA_MAX, PAPER_SIGMA_MIN, get_backbone
from .snapshot import FORMAT_NAME as SNAPSHOT_FORMAT
from .snapshot import NETWORK_CLASSES, SFDV_NUM_STEPS, is_sfdv, load_snapshot

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSERS = "diffusers"  # the dataset_name of any diffusers pipeline folder (models/diffusers_pipeline.py)


@dataclass
class LoadedNetwork:
    net: torch.nn.Module
    settings: dict          # snapshot: its stored settings; pre-trained: dataset_name, sigma range, model_source, ...
    dataset_name: str       # None for a foreign pickle given without one
    source: str             # 'snapshot', 'edm_pickle' (a model_path) or 'pretrained' (a table row)
    path: str = None        # the file that was read
    # A latent checkpoint holding both EMA and live U-Net weights: `net` carries the EMA (the teacher, as the paper
    # runs it inside LDM's ema_scope) and this is (live U-Net tensors, source) to start the student from.
    student_unet: tuple = None


def load_network(dataset_name=None, model_path=None, *, device="cpu", use_step_condition=False, cache_root="./src"):
    """Load a denoiser (see the module docstring).

    use_step_condition=True adds SFD-v's step layers, freshly initialised, to a checkpoint that has none;
    everything else still loads strictly. A snapshot keeps its own step layers either way.
    """
    if dataset_name is None and model_path is None:
        raise ValueError("load_network: give dataset_name (a table entry) or model_path (a .pkl or snapshot file)")
    if dataset_name in (None, DIFFUSERS) and _is_pipeline_folder(model_path):
        from .diffusers_pipeline import build_pipeline

        net, settings = build_pipeline(model_path, use_step_condition)  # any diffusers pipeline (design §6)
        return _finish(net, settings, DIFFUSERS, "pretrained", model_path, device)
    if dataset_name == DIFFUSERS and (model_path is None or not _is_ours(model_path)):
        raise ValueError("dataset_name 'diffusers' needs model_path = a diffusers pipeline folder (with "
                         "model_index.json) or a snapshot distilled from one")
    row = BACKBONES.get(dataset_name)
    if row is not None and row.family in _SELF_LOCATING and (model_path is None or not _is_ours(model_path)):
        # Families that find their own files (LDM zips, SD files/folders); model_path = that family's checkpoint.
        net, settings = _FAMILY_BUILDERS[row.family](row, model_path, use_step_condition, cache_root)
        return _finish(net, settings, dataset_name, "pretrained", settings.get("model_path") or model_path, device)
    if model_path is None:
        row = get_backbone(dataset_name)
        path = _backbone_file(row, cache_root)
        if _sniff(path) != "pickle":
            raise ValueError(f"{path} (checkpoint for {dataset_name}) is not an EDM network pickle; delete it to download it again")
        build = _FAMILY_BUILDERS.get(row.family)
        if build is None:
            raise ValueError(f"backbone family {row.family!r} of {dataset_name!r} has no builder in models.loader")
        net, settings = build(row, path, use_step_condition)
        return _finish(net, settings, dataset_name, "pretrained", path, device)

    if not os.path.isfile(model_path):
        raise ValueError(f"model_path {model_path!r} is not a file")
    kind = _sniff(model_path)
    if kind == "snapshot":
        net, settings = load_snapshot(model_path)
        if dataset_name is not None and settings.get("dataset_name") not in (None, dataset_name):
            raise ValueError(f"{model_path} was trained for dataset_name={settings['dataset_name']!r}, not {dataset_name!r}")
        if use_step_condition and not getattr(net, "use_step_condition", False):
            net = _with_step_layers(net, model_path)
            settings = dict(settings, use_step_condition=True)
        return _finish(net, settings, settings.get("dataset_name", dataset_name), "snapshot", model_path, device)
    if kind == "pickle":
        data = persistence.load_edm_pickle(model_path)
        if _is_paper_snapshot(data):
            net, settings = _build_paper_snapshot(data["model"], model_path)
            if dataset_name is not None and settings["dataset_name"] != dataset_name:
                raise ValueError(f"{model_path} was distilled for dataset_name={settings['dataset_name']!r}, "
                                 f"not {dataset_name!r}")
            return _finish(net, settings, settings["dataset_name"], "paper_snapshot", model_path, device)
        record = _ema_record(model_path, data)
        sigma_min, sigma_max = PAPER_SIGMA_MIN, EDM_SIGMA_MAX  # an EDM pickle without a dataset_name
        if dataset_name is not None:
            row = get_backbone(dataset_name)
            sigma_min, sigma_max = row.sigma_min, row.sigma_max
        # A pickle of an SFD-v network keeps its step layers; a plain one gets fresh ones on request.
        use_step_condition = bool(use_step_condition or (record.init_kwargs or {}).get("use_step_condition"))
        overrides = dict(use_fp16=False, use_step_condition=use_step_condition)
        if record.class_name == "EDMPrecond":
            overrides.update(sigma_min=sigma_min, sigma_max=sigma_max)
        with torch.random.fork_rng(devices=[]):  # fresh init must not shift the caller's RNG stream
            net = build_from_record(record, **overrides)
        settings = _pretrained_settings(dataset_name, sigma_min, sigma_max, use_step_condition, model_path)
        return _finish(net, settings, dataset_name, "edm_pickle", model_path, device)
    if kind in ("safetensors", "torch_legacy", "torch_zip"):
        raise ValueError(f"{model_path} is a checkpoint of another program (not an SFD snapshot or EDM pickle); for "
                         f"an LDM, Stable Diffusion or lsun_bedroom checkpoint pass its --dataset_name too")
    raise ValueError(f"{model_path} is neither an SFD snapshot (.safetensors) nor an EDM network pickle (.pkl)")


def build_from_record(record, **overrides):
    """Build our network for an EDM record (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond).

    The recorded constructor keywords are used, updated by `overrides` (e.g. use_step_condition=True,
    use_fp16=False); then every recorded tensor is copied in by name and shape (see
    `models.edm.load_state_strict`; SFD-v step layers absent from the record stay freshly initialised).
    """
    if not isinstance(record, persistence.PersistentRecord):
        raise ValueError(f"expected a PersistentRecord of a network, got {type(record).__name__}")
    cls = EDM_PRECOND_CLASSES.get(record.class_name)
    if cls is None:
        raise ValueError(f"the pickle holds a '{record.class_name}' network; supported: {', '.join(EDM_PRECOND_CLASSES)}")
    if record.init_kwargs is None or record.init_args is None:
        raise ValueError(f"the pickled '{record.class_name}' did not record its constructor arguments; cannot rebuild it")
    kwargs = {**record.init_kwargs, **overrides}
    try:
        net = cls(*record.init_args, **kwargs)
    except TypeError as e:
        raise ValueError(f"cannot build {record.class_name} from the pickle's constructor arguments: {e}") from None
    load_state_strict(net, persistence.record_tensors(record), source=f"pickled {record.class_name}")
    return net


def _build_edm(row, path, use_step_condition):
    """An EDM checkpoint from the table: built from the row's keywords (as the paper does), loaded strictly."""
    kwargs = dict(row.interface_kwargs(), use_step_condition=use_step_condition)
    with torch.random.fork_rng(devices=[]):
        net = NETWORK_CLASSES[row.network_class](**kwargs)
    load_state_strict(net, persistence.record_tensors(_ema_record(path)), source=path)
    return net, _pretrained_settings(row.dataset_name, row.sigma_min, row.sigma_max, use_step_condition, path)


def _build_state_dict_file(row, model_path, use_step_condition, cache_root):
    """A network released as a plain tensor dict (torch.save of a state_dict, the U-Net's own keys): read without
    running code (weights_only), then copied strictly into the row's network (cast to its float32)."""
    path = model_path or _backbone_file(row, cache_root)
    try:
        with open(path, "rb") as f:
            zipped = f.read(2) == b"PK"  # zip files are memory-mapped instead of read twice
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} cannot be read as a tensor dictionary ({type(e).__name__}: {first})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path} is not a plain tensor dictionary, the layout of {row.file_name}")
    with torch.random.fork_rng(devices=[]):
        net = NETWORK_CLASSES[row.network_class](**dict(row.interface_kwargs(), use_step_condition=use_step_condition))
    load_state_strict(net, {f"model.{k}": v for k, v in tensors.items()}, source=path)
    return net, _pretrained_settings(row.dataset_name, row.sigma_min, row.sigma_max, use_step_condition, path)


# Backbone family -> builder(row, path, use_step_condition) -> (net, settings). LDM / SD add theirs.
_FAMILY_BUILDERS = {"edm": _build_edm, "state_dict": _build_state_dict_file}
# Families whose builder locates its own files: builder(row, model_path or None, use_step_condition, cache_root).
_SELF_LOCATING = {"state_dict"}


def register_family(family, builder, finds_files=False):
    _FAMILY_BUILDERS[family] = builder
    if finds_files:
        _SELF_LOCATING.add(family)


def _is_pipeline_folder(path):
    return path is not None and os.path.isfile(os.path.join(path, "model_index.json"))


def _is_ours(path):
    """An SFD snapshot or an EDM pickle (which the generic code below reads for every family)."""
    return os.path.isfile(path) and _sniff(path) in ("snapshot", "pickle")


def _pretrained_settings(dataset_name, sigma_min, sigma_max, use_step_condition, path):
    return dict(dataset_name=dataset_name, model_source="edm", model_path=os.path.abspath(path),
                sigma_min=sigma_min, sigma_max=sigma_max, use_step_condition=bool(use_step_condition))


def _backbone_file(row, cache_root):
    if row.path is not None:
        path = os.path.join(REPO_ROOT, row.path)
        if not os.path.isfile(path):
            raise ValueError(f"the checkpoint of {row.dataset_name!r} should ship with the code at {row.path}, but it is missing")
        return path
    # Raises dnnlib.DownloadError naming the file, the URL and the folder when offline.
    return dnnlib.download_file(row.url, os.path.join(cache_root, row.dataset_name), file_name=row.file_name)


# torch.save's legacy (non-zip) format opens with a pickled magic number; an EDM pickle opens with a dict.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _sniff(path):
    """'snapshot' (ours), 'pickle' (EDM), 'torch_legacy', 'safetensors' (another program's) or None, from the
    content: extensions are not trusted."""
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_MAGIC))
        if head == _TORCH_LEGACY_MAGIC:
            return "torch_legacy"
        if head[:1] == b"\x80":  # pickle protocol >= 2
            return "pickle"
        if head[:2] == b"PK":  # torch.save's zip format
            return "torch_zip"
        if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
            f.seek(0)
            size = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(min(size, 1 << 27)))
                ours = (header.get("__metadata__") or {}).get("format") == SNAPSHOT_FORMAT
            except (ValueError, AttributeError):
                ours = False
            return "snapshot" if ours else "safetensors"
    return None


def _ema_record(path, data=None):
    data = persistence.load_edm_pickle(path) if data is None else data
    record = data.get("ema")
    if not isinstance(record, persistence.PersistentRecord):
        raise ValueError(f"{path} has no EDM network under 'ema' (keys: {', '.join(map(str, data))})")
    return record


def _is_paper_snapshot(data):
    record = data.get("model")
    return isinstance(record, InertObject) and record.class_name == f"{persistence.PAPER_MODULE}.EDMPrecond"


def _build_paper_snapshot(record, path):
    """A network distilled by the paper's own code: {'model': EDMPrecond} with its settings in `training_kwargs`.

    The paper's classes always carry the step layers (used only by SFD-v). The paper's classes record no
    constructor keywords, so the architecture is read off the pickled module tree (`_paper_architecture`): a
    network distilled from any EDM teacher loads, not only the table row's. LDM/SD snapshots of the paper's code
    hold a whole LDM and are not read.
    """
    from .edm import is_step_layer_key

    kwargs = dict(record.state.get("training_kwargs") or {})
    dataset_name = kwargs.get("dataset_name")
    if dataset_name is None:
        raise ValueError(f"{path} looks like a snapshot of the paper's code but records no training_kwargs/dataset_name")
    row = get_backbone(dataset_name)
    if row.family != "edm":
        raise ValueError(f"{path}: reading the paper's {dataset_name} snapshots is not supported (EDM backbones only)")
    use_step_condition = bool(kwargs.get("use_step_condition"))
    tensors = persistence.record_tensors(record)
    arch = _paper_architecture(record, tensors, path)
    with torch.random.fork_rng(devices=[]):
        net = NETWORK_CLASSES["EDMPrecond"](**dict(
            arch, sigma_min=float(record.state.get("sigma_min", row.sigma_min)),
            sigma_max=float(record.state.get("sigma_max", row.sigma_max)),
            sigma_data=float(record.state.get("sigma_data", 0.5)), use_fp16=False,
            use_step_condition=use_step_condition))
    if not use_step_condition:
        tensors = {k: v for k, v in tensors.items() if not is_step_layer_key(k)}  # present but never used
    load_state_strict(net, tensors, source=path)
    settings = {k: v for k, v in kwargs.items() if k != "class_name"}
    settings.setdefault("model_source", "edm")
    settings.update(sigma_min=float(kwargs.get("sigma_min", row.sigma_min)),
                    sigma_max=float(kwargs.get("sigma_max", row.sigma_max)), use_step_condition=use_step_condition)
    if is_sfdv(settings):
        settings["step_condition_range"] = list(SFDV_NUM_STEPS)
    return net, settings


def _paper_architecture(record, tensors, path):
    """EDMPrecond keywords of a pickled paper network, from its module tree and tensor shapes.

    The paper's EDMPrecond/SongUNet/DhariwalUNet are EDM's classes without EDM's constructor recording, so the
    pickle holds modules, not keywords. Everything the constructor needs leaves a trace: channel counts in the
    weights, block names per resolution, attention as qkv weights, the embedding type as a `freqs` buffer, the
    resample filter as a buffer, dropout as a block attribute. `load_state_strict` then checks the guess key by
    key and shape by shape.
    """
    model = (record.state.get("_modules") or {}).get("model")
    model_type = str(getattr(model, "class_name", "")).rsplit(".", 1)[-1]
    if model_type not in ("SongUNet", "DhariwalUNet"):
        raise ValueError(f"{path}: the paper's EDMPrecond wraps a {model_type or 'missing'} model; expected SongUNet "
                         f"or DhariwalUNet")
    top = record.state
    res = int(top["img_resolution"])
    blocks = {}  # level -> number of encoder blocks
    for key in tensors:
        m = re.fullmatch(r"model\.enc\.(\d+)x\1_block(\d+)\.conv0\.weight", key)
        if m:
            level = (res // int(m.group(1))).bit_length() - 1
            blocks[level] = max(blocks.get(level, 0), int(m.group(2)) + 1)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{path}: cannot read the U-Net levels from the pickled encoder")

    def block_out(level, idx=0):
        r = res >> level
        return tensors[f"model.enc.{r}x{r}_block{idx}.conv0.weight"].shape[0]

    def has_attention(level):
        r = res >> level
        return any(f"model.enc.{r}x{r}_block{i}.qkv.weight" in tensors for i in range(blocks[level]))

    layer0 = tensors["model.map_layer0.weight"]  # [emb_channels, noise_channels]
    first_conv = tensors[f"model.enc.{res}x{res}_conv.weight"].shape[0]
    model_channels = first_conv if model_type == "SongUNet" else layer0.shape[1]
    enc = (model.state.get("_modules") or {}).get("enc")
    some_block = next(b for name, b in enc.state["_modules"].items() if "_block" in name)
    arch = dict(
        img_resolution=res, img_channels=int(top["img_channels"]), label_dim=int(top.get("label_dim") or 0),
        model_type=model_type, model_channels=model_channels,
        channel_mult=[block_out(level) // model_channels for level in range(len(blocks))],
        channel_mult_emb=layer0.shape[0] // model_channels, num_blocks=blocks[0],
        attn_resolutions=[res >> level for level in range(len(blocks)) if has_attention(level)],
        dropout=float(some_block.state.get("dropout", 0.0)),
        label_dropout=float(model.state.get("label_dropout") or 0),
        augment_dim=tensors["model.map_augment.weight"].shape[1] if "model.map_augment.weight" in tensors else 0,
    )
    if model_type == "SongUNet":
        filters = [v for k, v in tensors.items() if k.endswith(".resample_filter")]
        resample_filter = [1, 1]
        if filters:  # stored as the 2-D outer product f f^T / (sum f)^2: its first row is f up to a factor
            row = filters[0].reshape(filters[0].shape[-2:])[0].double()
            resample_filter = [int(round(v)) for v in (row / row[0]).tolist()]
        decoder_skip = any(re.fullmatch(r"model\.dec\.(\d+)x\1_aux_norm\.weight", k) and not k.startswith(
            f"model.dec.{res}x{res}_") for k in tensors)
        arch.update(
            embedding_type="fourier" if "model.map_noise.freqs" in tensors else "positional",
            channel_mult_noise=layer0.shape[1] // model_channels,
            encoder_type=("residual" if any("_aux_residual." in k for k in tensors) else
                          "skip" if any("_aux_skip." in k for k in tensors) else "standard"),
            decoder_type="skip" if decoder_skip else "standard",
            resample_filter=resample_filter,
        )
    return arch


def _with_step_layers(net, source):
    with torch.random.fork_rng(devices=[]):
        grown = type(net)(**dict(net.init_kwargs, use_step_condition=True))
    load_state_strict(grown, net.state_dict(), source=source)
    return grown


def _finish(net, settings, dataset_name, source, path, device):
    student_unet = net.__dict__.pop("student_unet", None)
    net = net.to(device).float().eval().requires_grad_(False)
    return LoadedNetwork(net=net, settings=settings, dataset_name=dataset_name, source=source, path=os.path.abspath(path),
                         student_unet=student_unet)

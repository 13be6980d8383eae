"""Reading and writing EDM-format network pickles without ever running code from the file.

EDM (`NVlabs/edm`, torch_utils/persistence.py, format version 6) pickles every network class together with
the source text of its module: each such object is reduced to

    torch_utils.persistence._reconstruct_persistent_obj(
        {'type': 'class', 'version': 6, 'module_src': <source>, 'class_name': <name>,
         'state': <the object's __dict__, including _init_args and _init_kwargs>})

and EDM's reader `exec`s that source. Ours does not: a restricted unpickler accepts only the globals such
files need (tensor/storage rebuild functions, OrderedDict, numpy scalars, torch.nn containers, EasyDict)
and turns every persistent object into an inert `PersistentRecord`. `models.loader.build_from_record` then
builds OUR class with the recorded constructor keywords and copies the recorded tensors in by name, strictly.

`save_edm_pickle` writes the same format from our modules (tests, and shipping a built-in teacher).
"""

import copy
import copyreg
import importlib
import inspect
import os
import pickle
import sys
import warnings
from dataclasses import dataclass, field

import torch

import dnnlib
from torch_utils.restricted_pickle import InertObject, RestrictedUnpickler, UnsafePickleError

FORMAT_VERSION = 6  # EDM's `_version`


@dataclass
class PersistentRecord:
    """One persistent object of an EDM pickle, kept as data: nothing of `module_src` is executed."""

    class_name: str
    module_src: str
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # the object's __dict__ without _init_args/_init_kwargs


def _reconstruct_persistent_obj(meta):
    """The callable EDM pickles name for their persistent objects; here it only builds a record.

    It keeps this exact name and module so that a pickle written by `save_edm_pickle` refers to it, and
    so that even an unrestricted `pickle.load` inside this repository never executes `module_src`.
    """
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("malformed EDM persistent object: expected a dict with type='class'")
    if meta.get("version") != FORMAT_VERSION:
        raise pickle.UnpicklingError(f"EDM persistence version {meta.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    class_name, module_src = meta.get("class_name"), meta.get("module_src")
    if not isinstance(class_name, str) or not isinstance(module_src, str):
        raise pickle.UnpicklingError("malformed EDM persistent object: class_name and module_src must be strings")
    state = dict(meta.get("state") or {})
    init_args = state.pop("_init_args", None)
    init_kwargs = state.pop("_init_kwargs", None)
    return PersistentRecord(class_name=class_name, module_src=module_src,
                            init_args=tuple(init_args) if init_args is not None else None,
                            init_kwargs=dict(init_kwargs) if init_kwargs is not None else None, state=state)


# ----------------------------------------------------------------------------
# Restricted reading.

# Plain classes whose instances appear inside EDM network state; they are recorded, never instantiated.
_RECORDED_CLASSES = {
    f"torch.nn.modules.container.{name}" for name in ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")
}
# The paper's code (zju-pi/diff-sampler, sfd-main) saves its distilled networks as plain pickles of its
# models.networks_edm classes; they are read as inert records too and rebuilt as our classes by the loader.
PAPER_MODULE = "models.networks_edm"
_RECORDED_CLASSES |= {
    f"{PAPER_MODULE}.{name}" for name in ("EDMPrecond", "SongUNet", "DhariwalUNet", "UNetBlock", "Linear", "Conv2d",
                                          "GroupNorm", "PositionalEmbedding", "FourierEmbedding")
}


# The reader's settings for EDM network pickles (torch_utils.restricted_pickle.RestrictedUnpickler keywords).
EDM_PICKLE_RULES = dict(
    allowed={("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
             ("dnnlib.util", "EasyDict"): dnnlib.EasyDict},
    inert=_RECORDED_CLASSES.__contains__,
    refusal="refused to load global '{name}': EDM network pickles never need it (the file may be malicious or not an "
            "EDM network pickle)")


def load_edm_pickle(file_or_path):
    """Read an EDM-format pickle as data: {'ema': PersistentRecord, ...}. No code from the file runs.

    Raises UnsafePickleError for a global outside the allow-list and ValueError for a file that is
    not a readable pickle of a dict.
    """
    if isinstance(file_or_path, (str, os.PathLike)):
        with open(file_or_path, "rb") as f:
            return load_edm_pickle(f)
    name = getattr(file_or_path, "name", "<stream>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's TypedStorage deprecation notice
            data = RestrictedUnpickler(file_or_path, **EDM_PICKLE_RULES).load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {name} as an EDM network pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a pickled dict such as {{'ema': network, ...}}, found {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------
# Records -> our modules.


def record_tensors(record, prefix=""):
    """The state_dict (name -> tensor) recorded in a module record, walking `_modules` like torch does."""
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    tensors = {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            tensors[prefix + name] = value
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            tensors[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, InertObject)):
            raise ValueError(f"submodule '{prefix + name}' of the pickle is a {type(child).__name__}, not a module record")
        tensors.update(record_tensors(child, prefix + name + "."))
    return tensors


# ----------------------------------------------------------------------------
# Writing EDM-format pickles from our modules.

_source_cache = {}


def _module_source(cls):
    module = sys.modules[cls.__module__]
    if module not in _source_cache:
        _source_cache[module] = inspect.getsource(module)
    return _source_cache[module]


def _is_persistent_module(obj):
    # Our RecordedModule instances carry `_init_kwargs`, the field EDM's persistent classes record.
    return isinstance(obj, torch.nn.Module) and "_init_kwargs" in obj.__dict__


class _EDMPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, PersistentRecord):
            state = dict(obj.state)
            if obj.init_args is not None:
                state["_init_args"] = tuple(obj.init_args)
            if obj.init_kwargs is not None:
                state["_init_kwargs"] = dict(obj.init_kwargs)
            return _reconstruct_persistent_obj, (_meta(obj.class_name, obj.module_src, state),)
        if _is_persistent_module(obj):
            state = dict(obj.__dict__)
            state["_init_args"] = ()
            return _reconstruct_persistent_obj, (_meta(type(obj).__name__, _module_source(type(obj)), state),)
        if isinstance(obj, InertObject):
            module_name, _, name = obj.class_name.rpartition(".")
            cls = getattr(importlib.import_module(module_name), name)
            return copyreg._reconstructor, (cls, object, None), obj.state
        return NotImplemented


def _meta(class_name, module_src, state):
    return dict(type="class", version=FORMAT_VERSION, module_src=module_src, class_name=class_name, state=state)


def save_edm_pickle(path, data):
    """Write `data` (e.g. {'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': {...}}) as an
    EDM-format pickle. Our modules and PersistentRecords become persistent objects; module values are
    written like EDM's training snapshots: a CPU copy in eval mode without gradients."""
    if not isinstance(data, dict):
        raise ValueError("save_edm_pickle: data must be a dict such as {'ema': net}")
    data = {key: copy.deepcopy(value).cpu().eval().requires_grad_(False) if isinstance(value, torch.nn.Module) else value
            for key, value in data.items()}
    with dnnlib.util.atomic_path(path) as tmp, open(tmp, "wb") as f:
        _EDMPickler(f, protocol=4).dump(data)

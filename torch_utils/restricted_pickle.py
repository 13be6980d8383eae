"""The one restricted unpickler of the project: EDM and paper network pickles, NVIDIA detector pickles and legacy
(non-zip) CompVis checkpoints are all read with it.

A global resolves only when the caller's allow-list names it (`TENSOR_GLOBALS` plus the caller's own entries), or
when the caller accepts it as an inert record: an `InertObject` that keeps the class name and the pickled state
as data and is never built. Anything else is refused with `UnsafePickleError`. Nothing the file names is imported
or run.
"""

import _compat_pickle
import codecs
import collections
import io
import pickle
import types

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global that the reader does not allow."""


class InertObject(dict):
    """An instance of a class that is never built: `class_name`, the pickled `state`, and what pickle appends.

    A dict subclass, so that the items pickle sets on dict-like objects land somewhere harmless.
    """

    class_name = None  # set on the per-class subclasses made by `inert_class`

    def __new__(cls, *args, **kwargs):
        obj = dict.__new__(cls)
        obj.state, obj.appended = {}, []
        return obj

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {"state": state}

    def append(self, value):
        self.appended.append(value)

    def extend(self, values):
        self.appended.extend(values)

    def __repr__(self):
        return f"InertObject({self.class_name})"


_inert_classes = {}


def inert_class(qualified_name):
    """The InertObject subclass standing for the class `module.name` (one per name)."""
    if qualified_name not in _inert_classes:
        module, _, short = qualified_name.rpartition(".")
        _inert_classes[qualified_name] = type(f"{short}Record", (InertObject,),
                                              {"class_name": qualified_name, "__module__": "inert." + module})
    return _inert_classes[qualified_name]


def _storage_from_bytes(data):
    # Plain-pickled storages carry a small torch.save stream; torch's own hook for it loads without restriction.
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("a torch storage payload must be bytes")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _copyreg_reconstructor(cls, base, base_state):
    # Protocols 0/1 spell "make an instance of cls" this way; only inert records may be made.
    if not (isinstance(cls, type) and issubclass(cls, InertObject)) or base is not object or base_state is not None:
        raise UnsafePickleError(f"copyreg._reconstructor for {cls!r} is not allowed")
    return cls()


def _tensor_globals():
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "object"): object,
        ("copyreg", "_reconstructor"): _copyreg_reconstructor,
        ("_codecs", "encode"): codecs.encode,  # protocol-2 spelling of bytes
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    rebuilders = [(torch._utils, name) for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                                    "_rebuild_parameter", "_rebuild_parameter_with_state")]
    for module, name in rebuilders + [(torch._tensor, "_rebuild_from_type_v2")]:
        if hasattr(module, name):  # each exists in the torch versions that write it
            allowed[(module.__name__, name)] = getattr(module, name)
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; both resolve to the installed numpy.
    core = np._core if hasattr(np, "_core") else np.core
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{prefix}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


# What a pickle of tensors, parameters, numpy arrays and plain containers needs; every reader allows these.
TENSOR_GLOBALS = _tensor_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """allowed: (module, name) -> object, on top of TENSOR_GLOBALS and torch dtypes; inert: 'module.name' -> bool,
    the classes read as InertObject records; resolve: (module, name) -> object or None, a last per-use rule;
    refusal: the error for anything else, formatted with {name}."""

    def __init__(self, file, allowed=None, inert=None, resolve=None, refusal="refused to load global '{name}'",
                 **kwargs):
        super().__init__(file, **kwargs)
        self.allowed = {**TENSOR_GLOBALS, **(allowed or {})}
        self.inert, self.resolve, self.refusal = inert, resolve, refusal

    def find_class(self, module, name):
        # Protocols 0-2 spell some modules the Python 2 way (__builtin__, copy_reg); map them as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if self.inert is not None and self.inert(f"{module}.{name}"):
            return inert_class(f"{module}.{name}")
        found = self.resolve(module, name) if self.resolve is not None else None
        if found is not None:
            return found
        raise UnsafePickleError(self.refusal.format(name=f"{module}.{name}"))


def as_pickle_module(**settings):
    """A stand-in for the `pickle` module (torch.load's pickle_module) that reads with these settings."""

    class Unpickler(RestrictedUnpickler):
        def __init__(self, file, **kwargs):
            super().__init__(file, **settings, **kwargs)

    return types.SimpleNamespace(Unpickler=Unpickler, load=lambda file, **kwargs: Unpickler(file, **kwargs).load(),
                                 __name__="restricted_pickle")

"""What lets a checkpoint rebuild its own network: modules that record their constructor keywords
(`RecordedModule`), the strict copy of stored tensors into a network (`load_state_strict`), and the names of SFD-v's
step-condition layers, the one exception to strictness (design §5-6)."""

import copy
import functools
import inspect

import numpy as np
import torch

# Module names that exist only in SFD-v networks (a plain checkpoint has none of them): those of EDM's U-Nets, then
# those of the OpenAI/CompVis U-Net (models/unet.py), as in the paper's code.
STEP_LAYER_NAMES = ("map_step", "map_step_layer0", "map_step_layer1", "affine_step", "nfe_embed", "emb_nfe_layers")


def is_step_layer_key(key):
    """True for a state_dict key that belongs to an SFD-v step-condition layer."""
    return any(part in STEP_LAYER_NAMES for part in key.split("."))


# ----------------------------------------------------------------------------
# Constructor recording: a snapshot stores `init_kwargs` and rebuilds the network from it.


def _to_plain(value):
    """Constructor arguments as JSON types (numpy scalars -> float/int, tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _recording_init(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        recorded = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(self).__name__} takes keyword arguments only, got extra {value!r}")
            else:
                recorded[name] = value
        init(self, *args, **kwargs)
        # Set after init so that a subclass's record replaces the one its base class wrote.
        self._init_kwargs = _to_plain(recorded)

    return wrapper


class RecordedModule(torch.nn.Module):
    """A torch module that remembers every constructor argument (defaults included) as `init_kwargs`.

    Subclasses get this automatically; `type(net)(**net.init_kwargs)` rebuilds the same architecture.
    The record lives in `_init_kwargs`, the attribute EDM's persistence pickles, so our modules can be
    written as EDM-format pickles (torch_utils/persistence.py).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(cls.__init__)

    @property
    def init_kwargs(self):
        return copy.deepcopy(self._init_kwargs)


# ----------------------------------------------------------------------------
# Strict loading.


def load_state_strict(net, tensors, source):
    """Copy `tensors` (name -> tensor) into `net` by name; every key and every shape must match.

    The one exception is SFD-v: when `tensors` has no step-layer key at all (a plain checkpoint) the
    network's step layers keep their fresh initialisation (design §5). Errors list the offending keys.
    """
    own = net.state_dict()
    source_has_step_layers = any(is_step_layer_key(k) for k in tensors)
    missing = [k for k in own if k not in tensors and (source_has_step_layers or not is_step_layer_key(k))]
    unexpected = [k for k in tensors if k not in own]
    not_tensors = [k for k in tensors if k in own and not isinstance(tensors[k], torch.Tensor)]
    wrong_shape = [f"{k} {tuple(tensors[k].shape)} != {tuple(own[k].shape)}" for k in own
                   if k in tensors and k not in not_tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("not a tensor", not_tensors),
                        ("wrong shape (file != network)", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{source} does not match {type(net).__name__}({_short_kwargs(net)}): " + "; ".join(problems))
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


def _short_kwargs(net):
    kwargs = getattr(net, "_init_kwargs", None) or {}
    keys = ("model_type", "img_resolution", "model_channels", "channel_mult", "label_dim", "use_step_condition")
    return ", ".join(f"{k}={kwargs[k]!r}" for k in keys if k in kwargs)

"""torchvision beside a torch that lacks its CUDA libraries.

The package index's torchvision wheels are CUDA builds. Beside a CPU-only torch (this project's CPU install, CI's)
their compiled operators cannot load, and `import torchvision` then fails: it registers fake kernels for two of
those operators (nms, qnms) without checking that they exist. With it fail diffusers, transformers' image parts and
open_clip, which all import torchvision. `allow_import()`, called before anything imports torchvision, declares
those two operators' schemas when the compiled library did not load, so the import goes through. The operators then
have no kernels; nothing in this project calls them. With a torchvision that matches its torch nothing is declared.
"""

import importlib.machinery
import importlib.util
import os
import sys

import torch

_declared = []  # the Library objects holding the declared schemas (they last as long as these objects)
_checked = False


def allow_import():
    """Make `import torchvision` work where its compiled operators cannot load (see above). Idempotent and cheap;
    does nothing once torchvision is imported, or where it is not installed."""
    global _checked
    if _checked or "torchvision" in sys.modules:
        return
    _checked = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return
    folder = os.path.dirname(spec.origin)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "_C" + suffix)
        if os.path.isfile(path):
            try:
                torch.ops.load_library(path)  # what torchvision's import does first; a second load changes nothing
            except OSError:
                pass
            break
    missing = [op for op in ("nms", "qnms") if not torch._C._jit_get_schemas_for_operator(f"torchvision::{op}")]
    if missing:
        lib = torch.library.Library("torchvision", "DEF")
        for op in missing:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _declared.append(lib)

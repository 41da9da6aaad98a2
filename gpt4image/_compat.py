"""Let ``import torchvision`` work when its compiled extension cannot load.

The registry's torchvision 0.28.0 wheel is a CUDA build. Installed next to the CPU build of
torch 2.13.0, its ``_C`` extension fails to load, and ``import torchvision`` then dies while
registering fake kernels for ``torchvision::nms`` / ``torchvision::qnms``, operators whose schema
only the extension defines. Defining those two schemas (without kernels) is enough for the import,
and so for timm and clip, which only need the models, transforms and datasets.

On a normal install the extension loads, the operators exist, and this module does nothing.
"""
import glob
import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the registration alive for the life of the process


def _extension_loads(package_dir):
    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, ImportError, RuntimeError):
            return False
    return False


def _operator_exists(name):
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def ensure_torchvision_importable():
    """Register the missing ``torchvision::nms``/``qnms`` schemas if (and only if) needed.

    Returns True when it had to register them (the compiled torchvision ops are then unavailable,
    which nothing in this project uses).
    """
    global _library
    if _library is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False  # torchvision not installed: the import will say so itself
    if _extension_loads(os.path.dirname(spec.origin)):
        return False
    missing = [name for name in _SCHEMAS if not _operator_exists(name)]
    if not missing:
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])
    return True


def import_clip():
    """``import clip`` without its pkg_resources deprecation warning (clip's code, not ours)."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import clip
    return clip

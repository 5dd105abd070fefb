"""Compatibility shim for torchvision on CPU-only torch (applied when tdkd_cli is imported).

Why: on these machines the only torchvision 0.28.0 wheel on the registry is a CUDA build. With the
CPU build of torch 2.13.0 its compiled extension (``torchvision/_C*.so``) fails to load, and
``import torchvision`` then dies in ``torchvision/_meta_registrations.py`` with
``RuntimeError: operator torchvision::nms does not exist``. transformers' model classes and timm
import torchvision, so both would break with it.

Fix: before anything imports torchvision, try to load its extension with
``torch.ops.load_library``. If that fails, declare the two operator schemas that torchvision's
import-time meta registrations refer to (``torchvision::nms`` and ``torchvision::qnms``) in a
``torch.library`` fragment. The pure-Python parts of torchvision (transforms, datasets, which timm
and transformers use) then import and work; tdkd decodes images with PIL, never with torchvision's
C++ ops. Where the extension loads (a matching torchvision build), nothing is changed.

This module is deliberately tiny and idempotent; ``apply()`` runs once from ``tdkd_cli/__init__``.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_APPLIED = False
_LIBRARY = None  # keep the fragment alive: dropping it would unregister the schemas


def _torchvision_extension() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd")))
        if found:
            return found[0]
    return None


def apply() -> bool:
    """Make ``import torchvision`` work on CPU torch. Returns True when the shim was needed."""
    global _APPLIED, _LIBRARY
    if _APPLIED:
        return _LIBRARY is not None
    _APPLIED = True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    ext = _torchvision_extension()
    if ext is None:
        return False
    try:
        torch.ops.load_library(ext)
        return False
    except (OSError, RuntimeError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True

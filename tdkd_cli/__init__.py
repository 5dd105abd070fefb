"""tdkd: knowledge distillation with over-parameterized (MPO) students.

The public Python API (``from tdkd_cli import overparameterize, merge, ...``; see docs/API.md) is
re-exported lazily from ``tdkd_cli.api``: the names load on first use, so importing the package (and
``tdkd --help``) does not import torch.

The package, by concern (each subpackage's docstring says what it may import; pyproject.toml's
import-linter contract checks it):  core <- tensor <- io <- methods <- engine <- tools <- api | cli.

Importing the package installs a one-shot import hook that applies the torchvision compatibility
shim (see ``_compat``) just before torchvision is first imported, so transformers and timm work on
CPU-only torch while ``tdkd --help`` does not pay for importing torch.
"""

from __future__ import annotations

import sys

from .core.version import __version__

API = (
    "MPOConfig", "overparameterize", "TensorConstraint", "DistillLoss", "param_groups", "merge",
    "save_mpo", "load_mpo", "register_method", "list_methods", "kd_loss", "TdkdError",
)
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tdkd_cli' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API])


class _TorchvisionShimHook:
    """meta_path finder that runs ``_compat.apply()`` the first time torchvision is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            _remove_hook()
            from . import _compat

            _compat.apply()
        return None  # let the normal finders import the module


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionShimHook)]


if "torchvision" in sys.modules:  # imported before us: apply now (torch is already loaded)
    from . import _compat

    _compat.apply()
elif not any(isinstance(f, _TorchvisionShimHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionShimHook())

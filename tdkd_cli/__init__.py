"""tdkd: knowledge distillation with over-parameterized (MPO) students.

Importing the package installs a one-shot import hook that applies the torchvision compatibility
shim (see ``_compat``) just before torchvision is first imported, so transformers and timm work on
CPU-only torch while ``tdkd --help`` does not pay for importing torch.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"


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

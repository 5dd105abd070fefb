"""Intermediate features by dotted module path, captured with forward hooks.

Any module of an HF or timm model can feed a loss term without editing model code: ``FeatureTap``
registers one forward hook per named module, keeps each module's latest output (the first element
when a module returns a tuple, as HF layers do) and removes every hook on ``close()`` (or at the end
of a ``with`` block), so a model leaves training with no hooks attached.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core.errors import UsageError


def resolve_paths(model: nn.Module, paths: Sequence[str], role: str = "model") -> dict[str, nn.Module]:
    """Modules by dotted path; a path that names no module is a UsageError naming it."""
    modules = dict(model.named_modules())
    found = {}
    for path in paths:
        if path not in modules:
            near = [n for n in modules if n.endswith(path.split(".")[-1])][:3]
            hint = f" (modules with that ending: {', '.join(near)})" if near else ""
            raise UsageError(f"{role} has no module {path!r}{hint}")
        found[path] = modules[path]
    return found


class FeatureTap:
    """Outputs of named modules during each forward pass: ``tap.features[path]``."""

    def __init__(self, model: nn.Module, paths: Sequence[str], role: str = "model"):
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for path, module in resolve_paths(model, paths, role).items():
            self._handles.append(module.register_forward_hook(self._keeper(path)))

    def _keeper(self, path: str):
        def hook(module, args, output):
            self.features[path] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def clear(self) -> None:
        self.features = {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features = {}

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

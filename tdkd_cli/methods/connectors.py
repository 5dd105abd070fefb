"""Connectors between a student's and a teacher's features of different layouts, for feature
methods across architectures (a CNN student under a ViT teacher, or the reverse).

A CNN gives feature maps (batch, C, H, W), a ViT token sequences (batch, L, D) whose last g*g tokens
are a g x g grid of patches after a few prefix tokens (class, distillation, registers). The
connector brings the student's feature onto the teacher's layout and width, and ``teacher_view``
drops what has no counterpart (the prefix tokens):

    map -> tokens   average-pool the map to g x g, one token per cell, Linear C -> D
    tokens -> map   the patch tokens as a g x g map, resized (bilinear) to H x W, 1x1 Conv2d D -> C

Trained with the student, saved in its checkpoints, dropped at merge like every connector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_PREFIX = 8  # class, distillation and register tokens before the patch grid


def token_grid(tokens: int) -> tuple[int, int] | None:
    """(grid side g, prefix tokens) of a sequence of ``tokens``: the largest g with g*g <= tokens
    and at most MAX_PREFIX tokens before the grid; None when there is no such grid."""
    g = math.isqrt(tokens)
    prefix = tokens - g * g
    return (g, prefix) if g > 0 and prefix <= MAX_PREFIX else None


def layout_check(s: tuple, t: tuple) -> str | None:
    """Why a token sequence and a feature map cannot be compared (None when they can)."""
    tokens = s if len(s) == 3 else t
    if token_grid(tokens[1]) is None:
        return f"{tokens[1]} tokens do not form a square grid of patches (after up to {MAX_PREFIX} prefix tokens)"
    return None


class LayoutConnector(nn.Module):
    """Student feature -> the teacher's layout and width (see the module docstring)."""

    def __init__(self, s: tuple, t: tuple):
        super().__init__()
        self.to_tokens = len(s) == 4
        if self.to_tokens:
            self.grid, self.prefix = token_grid(t[1])
            self.proj = nn.Linear(s[1], t[2])
        else:
            self.grid, self.prefix = token_grid(s[1])
            self.size = tuple(t[2:])
            self.proj = nn.Conv2d(s[2], t[1], kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype)
        if self.to_tokens:
            x = F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)
            return self.proj(x)
        b, _, d = x.shape
        x = x[:, self.prefix:].transpose(1, 2).reshape(b, d, self.grid, self.grid)
        return self.proj(F.interpolate(x, size=self.size, mode="bilinear", align_corners=False))

    def teacher_view(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, self.prefix:] if self.to_tokens else t

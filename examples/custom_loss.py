"""A user-registered distillation loss: ``tdkd distill --plugin examples/custom_loss.py --method cosine``.

Importing this file registers two methods with tdkd (``tdkd methods --plugin examples/custom_loss.py``
lists them); a recipe's ``methods:`` or ``--method`` then names them like the built-in ones, with
their options (``--method cosine:weight=2,temperature=2``). An installed package offers methods the
same way through the entry-point group ``tdkd.methods`` (see docs/API.md), with no --plugin needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tdkd_cli import register_method


@register_method("cosine", kind="response", paper="cosine distance of softened class distributions (example plug-in)",
                 options={"temperature": (1.0, "temperature T of both softmaxes")})
def cosine(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 - cos(p_s, p_t), averaged over the batch."""
    ps = F.softmax(student_logits.float() / temperature, dim=-1)
    pt = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (1.0 - F.cosine_similarity(ps, pt, dim=-1)).mean()


@register_method("feature-cosine", kind="feature", paper="cosine distance of module outputs (example plug-in)")
def feature_cosine(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """1 - cos of the flattened features per example (a connector maps the student's width first)."""
    s = student_feature.float().flatten(1)
    t = teacher_feature.detach().float().flatten(1)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()

"""Distillation losses (PAPER.md §3): cross-entropy, logit KD, hidden-state MSE and attention-map
MSE (the OPDF tensor constraint is tensor/constraint.py's; the layer map io/layers.py's).

Pure functions on tensors; the training loop decides which to combine and with what weights."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.errors import UsageError


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification (long labels) or MSE for regression (float labels, 1 output)."""
    if labels.dtype.is_floating_point:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) with p = softmax(z / T), averaged over the batch. The teacher side is
    detached."""
    if temperature <= 0:
        raise UsageError(f"temperature must be positive (got {temperature})")
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return (t * t) * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               layer_map: Sequence[tuple[int, int]], projection: torch.nn.Module | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over mapped (student, teacher) layer pairs of the MSE between hidden states, the student
    side projected to the teacher's width when they differ; padding excluded when ``mask`` given."""
    losses = []
    for s_i, t_i in layer_map:
        s = student_hidden[s_i].float()
        t = teacher_hidden[t_i].detach().float()
        if projection is not None:
            s = projection(s)
        if s.shape != t.shape:
            raise UsageError(f"hidden sizes differ ({s.shape[-1]} vs {t.shape[-1]}): a projection is needed")
        if mask is not None:
            m = mask.unsqueeze(-1).float()
            losses.append(((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1]).clamp_min(1.0))
        else:
            losses.append(F.mse_loss(s, t))
    return torch.stack(losses).mean()


def attention_mse(student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                  layer_map: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mean over mapped layer pairs of the MSE between attention probability maps (B, H, L, L)."""
    losses = []
    for s_i, t_i in layer_map:
        s, t = student_attn[s_i].float(), teacher_attn[t_i].detach().float()
        if s.shape != t.shape:
            raise UsageError(f"attention maps differ in shape ({list(s.shape)} vs {list(t.shape)}): heads must match")
        losses.append(F.mse_loss(s, t))
    return torch.stack(losses).mean()

"""Distillation losses (PAPER.md §3): cross-entropy, logit KD, hidden-state MSE, attention-map MSE,
and the OPDF tensor constraint loss between student and teacher auxiliary MPO cores.

Pure functions on tensors; the training loop decides which to combine and with what weights."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import UsageError


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


def teacher_layer(i: int, student_layers: int, teacher_layers: int) -> int:
    """Partner teacher layer of student layer i (0-based): ceil((i+1) * L_T / L_S) - 1 (2i+1 for 12->6)."""
    return math.ceil((i + 1) * teacher_layers / student_layers) - 1


def layer_map(spec: str | None, student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer paired with each student layer by the layer-wise losses (hidden states,
    attention maps, tensor constraint). ``spec``: None or 'uniform' (``teacher_layer``), or a
    comma-separated list with one teacher layer per student layer, e.g. '0,1,2'."""
    if spec is None or str(spec).strip().lower() == "uniform":
        return [teacher_layer(i, student_layers, teacher_layers) for i in range(student_layers)]
    parts = [x.strip() for x in str(spec).split(",")]
    if not all(re.fullmatch(r"\d+", x) for x in parts):
        raise UsageError(f"layer_map '{spec}': expected 'uniform' or teacher layer numbers like 0,1,2")
    out = [int(x) for x in parts]
    if len(out) != student_layers:
        raise UsageError(f"layer_map '{spec}' names {len(out)} teacher layers but the student has {student_layers} layers")
    bad = [x for x in out if x >= teacher_layers]
    if bad:
        raise UsageError(f"layer_map '{spec}': the teacher has layers 0..{teacher_layers - 1} (got {bad[0]})")
    return out


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


# ----------------------------------------------------------------------------------------------
# Tensor constraint (OPDF)
# ----------------------------------------------------------------------------------------------
@dataclass
class AlignedPair:
    student: str  # student module name
    teacher: str  # teacher module name
    cores: tuple[int, ...]  # auxiliary core indices aligned (identical shapes)
    skipped: tuple[int, ...]  # auxiliary cores whose shapes differ


_LAYER_RE = re.compile(r"(?P<pre>.*\blayer\.|.*\bblocks\.)(?P<idx>\d+)(?P<post>\..*)")


def partner_name(student_name: str, lmap: Sequence[int]) -> str | None:
    """Name of the teacher module that pairs with a student module under the layer map ``lmap``
    (``layer_map``): same module in teacher layer lmap[i]. None outside the encoder layers."""
    m = _LAYER_RE.fullmatch(student_name)
    if m is None or int(m["idx"]) >= len(lmap):
        return None
    return f"{m['pre']}{lmap[int(m['idx'])]}{m['post']}"


def pair_layers(student_shapes: dict[str, list[tuple[int, ...]]], teacher_shapes: dict[str, list[tuple[int, ...]]],
                lmap: Sequence[int] | Callable[[str], str | None]) -> list[AlignedPair]:
    """Match each decomposed student matrix to the teacher matrix of the same type in layer
    lmap[i] (by default g(i) = ceil((i+1) L_T / L_S) - 1, see ``layer_map``), or to the name a
    partner function gives, and list which auxiliary cores (all but the central one) have
    identical shapes and so can be aligned. ``*_shapes``: module name -> core shapes."""
    partner = lmap if callable(lmap) else (lambda name: partner_name(name, lmap))
    pairs = []
    for name, s_shapes in student_shapes.items():
        t_name = partner(name)
        if t_name is None:
            continue
        t_shapes = teacher_shapes.get(t_name)
        if t_shapes is None or len(t_shapes) != len(s_shapes):
            continue
        c = (len(s_shapes) - 1) // 2
        aux = [k for k in range(len(s_shapes)) if k != c]
        same = tuple(k for k in aux if tuple(s_shapes[k]) == tuple(t_shapes[k]))
        pairs.append(AlignedPair(name, t_name, same, tuple(k for k in aux if k not in same)))
    return pairs


def tensor_constraint_loss(student_cores: dict[str, Sequence[torch.Tensor]], teacher_cores: dict[str, Sequence[torch.Tensor]],
                           pairs: Sequence[AlignedPair]) -> torch.Tensor:
    """L_aux = mean over matrices m of sum over aligned auxiliary cores k of
    MSE(core_k^S(m), stopgrad(core_k^T(m'))). Gradients reach the student cores only."""
    terms = []
    for p in pairs:
        if not p.cores:
            continue
        s, t = student_cores[p.student], teacher_cores[p.teacher]
        terms.append(sum(F.mse_loss(s[k].float(), t[k].detach().float()) for k in p.cores))
    if not terms:
        raise UsageError("no auxiliary cores can be aligned between student and teacher (factor shapes differ)")
    return torch.stack(terms).mean()

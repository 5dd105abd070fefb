"""The OPDF tensor constraint (PAPER.md §3): the teacher's partner matrices decomposed once with
factor shapes matched to the student's, the auxiliary cores of each pair that can be aligned, and
the loss that pulls the student's auxiliary cores towards the teacher's (teacher side detached).

Which teacher matrix pairs with which student matrix is the caller's ``partner`` function (the
layer map, io.layers.partner_fn); nothing here knows model families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import mpo, tensorize
from .align import partner_module, weight_dims
from ..core.errors import UsageError


@dataclass
class AlignedPair:
    student: str  # student module name
    teacher: str  # teacher module name
    cores: tuple[int, ...]  # auxiliary core indices aligned (identical shapes)
    skipped: tuple[int, ...]  # auxiliary cores whose shapes differ


def pair_layers(student_shapes: dict[str, list[tuple[int, ...]]], teacher_shapes: dict[str, list[tuple[int, ...]]],
                            partner: Callable[[str], str | None]) -> list[AlignedPair]:
    """Match each decomposed student matrix to the teacher matrix ``partner(name)`` gives (the
    layer map's partner, io.layers.partner_fn) and list which auxiliary cores (all but the central
    one) have identical shapes and so can be aligned. ``*_shapes``: module name -> core shapes."""
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


def teacher_cores(student: nn.Module, teacher: nn.Module,
                  partner: Callable[[str], str | None]) -> tuple[dict, list[AlignedPair]]:
    """Decompose the teacher's partner matrices once with factor shapes matched to the student's
    (float64 SVD, cores in the teacher's dtype, detached) and pair their auxiliary cores.
    Returns (teacher cores by teacher module name, pairs); raises when no core can be aligned."""
    s_mods = tensorize.mpo_modules(student)
    if not s_mods:
        raise UsageError("the tensor constraint needs an MPO student (mpo: true, a decompose output, "
                         "or tdkd_cli.overparameterize(student))")
    t_mods = dict(teacher.named_modules())
    s_shapes, t_shapes, t_cores = {}, {}, {}
    for name, mod in s_mods.items():
        plan = tensorize.layer_plan(mod)
        s_shapes[name] = [tuple(c.shape) for c in tensorize.layer_cores(mod)]
        t_name = partner(name)
        t_mod = partner_module(t_mods, t_name, mod)
        if t_mod is None or t_name in t_cores:
            continue
        t_dims, t_kernel = weight_dims(t_mod)
        _, (to, ti) = mpo.align_plans((plan.out_features, plan.weight_shape[1]), t_dims, plan.n,
                                      (plan.out_shape, plan.in_shape), kernels=(plan.kernel, t_kernel))
        weight = t_mod.weight.detach()
        cores = mpo.decompose(weight.reshape(weight.shape[0], -1), to, ti)
        t_cores[t_name] = [c.detach().to(weight.dtype) for c in cores]
        t_shapes[t_name] = [tuple(c.shape) for c in t_cores[t_name]]
    pairs = pair_layers(s_shapes, t_shapes, partner)
    if not sum(len(p.cores) for p in pairs):
        raise UsageError("tensor constraint: no auxiliary core of the student has the shape of its teacher partner; "
                         "set shapes so the trailing factors agree, or tensor_lambda: 0")
    return t_cores, pairs


def describe(pairs: Sequence[AlignedPair]) -> str:
    """One line on what the constraint aligns, for the run's log."""
    aligned = sum(len(p.cores) for p in pairs)
    skipped = sum(len(p.skipped) for p in pairs)
    return (f"tensor constraint: {len(pairs)} matrix pairs, {aligned} auxiliary cores aligned"
            + (f", {skipped} skipped (shapes differ)" if skipped else ""))

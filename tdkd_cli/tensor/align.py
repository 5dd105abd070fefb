"""Over-parameterizing a model: choose its target layers, plan each one's MPO factor shapes (planned
against a teacher's partner layers, when there is one, so that auxiliary cores can be aligned by the
tensor constraint) and replace their weights by cores, in place.

``partner`` (student module name -> teacher module name or None) comes from the caller (the layer
map, io.layers.partner_fn); nothing here knows model files or recipes.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from . import mpo, tensorize
from ..core.errors import UsageError


def weight_dims(module: nn.Module) -> tuple[tuple[int, int], int]:
    """((out, in/groups) channels, kernel window elements) of a Linear or Conv2d weight."""
    shape = tuple(module.weight.shape)
    return (shape[0], shape[1]), math.prod(shape[2:])


def partner_module(t_mods: dict, t_name: str | None, student_module: nn.Module) -> nn.Module | None:
    """The teacher module ``t_name`` when it is a layer of the student module's kind."""
    t_mod = t_mods.get(t_name) if t_name else None
    kinds = (tensorize.linear_types(), nn.Conv2d)
    same = any(isinstance(t_mod, k) and isinstance(student_module, k) for k in kinds)
    return t_mod if same else None


def align_to_teacher(plans: Sequence[tensorize.LayerPlan], model: nn.Module, teacher: nn.Module,
                     partner: Callable[[str], str | None], n: int) -> int:
    """Re-plan the factor shapes of each layer that has a teacher partner of its kind so that the
    trailing factors are common to both sides (mpo.align_plans). Returns how many were re-planned."""
    s_mods, t_mods = dict(model.named_modules()), dict(teacher.named_modules())
    aligned = 0
    for p in plans:
        t_mod = partner_module(t_mods, partner(p.name), s_mods[p.name])
        if t_mod is None:
            continue
        t_dims, t_kernel = weight_dims(t_mod)
        (so, si), _ = mpo.align_plans((p.out_features, p.weight_shape[1]), t_dims, n, kernels=(p.kernel, t_kernel))
        p.out_shape, p.in_shape = so, si
        p.bonds = mpo.full_bonds(so, si, p.rank)
        aligned += 1
    return aligned


def overparameterize(model: nn.Module, family: str, *, targets: Sequence[str] | None = None, n: int = 5,
                     shapes: Sequence[str] = (), rank: int | None = None, teacher: nn.Module | None = None,
                     partner: Callable[[str], str | None] | None = None) -> list[tensorize.LayerPlan]:
    """Decompose the target layers of ``model`` into MPO cores in place and return their plans.

    ``targets``: glob patterns of module names (default: the family's, tensorize.default_targets);
    ``shapes``: explicit factor shapes ('768=8,2,2,2,2,6'); without them and with a ``teacher`` and
    its ``partner`` function, shapes are planned so auxiliary cores match the teacher's."""
    if n < 2:
        raise UsageError(f"n must be at least 2 (got {n})")
    if rank is not None and rank < 1:
        raise UsageError(f"rank must be at least 1 (got {rank})")
    if tensorize.mpo_modules(model):
        raise UsageError("the model is already over-parameterized (it has MPO layers)")
    patterns = list(targets or ()) or list(tensorize.default_targets(model, family))
    names = tensorize.select_targets(model, patterns)
    explicit = tensorize.parse_shapes(shapes or [])
    plans = tensorize.plan_layers(model, names, n, explicit, rank)
    if teacher is not None and partner is not None and not explicit:
        align_to_teacher(plans, model, teacher, partner, n)
    tensorize.tensorize(model, plans)
    return plans

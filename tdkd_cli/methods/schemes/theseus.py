"""BERT-of-Theseus (Xu et al., EMNLP 2020): compress by module replacement.

The teacher is the predecessor (a fine-tuned model, frozen); its L layers form L/k groups of k.
The student is the successor: L/k layers, by default cut from the predecessor (layer g*k, the
first of group g), embeddings and head copied; it may also be given (``--student``, e.g. a
`tdkd decompose` output of that cut) when it has L/k layers of the predecessor's kind. In each
micro-batch of step t, successor layer g stands in for predecessor group g with probability

    p_t = min(1, base + rate * t)

(drawn from a generator seeded by the run's seed, the step and the micro-batch, so a resumed run
draws what an uninterrupted one would); otherwise the group's k predecessor layers run in its
place (scheme.Chain; frozen, in eval mode). Everything of the successor trains: its layers, and
the embeddings and head the predecessor layers work between. Once p_t reaches 1 the successor
trains alone. Evaluation, best/ and merge always use the successor alone (L/k layers: a plain
model). With OPDF the successor layers are MPO and the tensor constraint pairs successor layer g
with predecessor layer (g+1)k-1, the last of the group it replaces (the uniform layer map).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...io import layers, pair as pair_mod
from ...core.errors import UsageError
from ...core.recipe import Recipe
from .base import Chain, Scheme, swapped


def probability(step: int, base: float, rate: float) -> float:
    """p_t = min(1, base + rate * t): the chance that a successor layer replaces its group."""
    return min(1.0, base + rate * step)


def steps_to_one(base: float, rate: float) -> int | None:
    """The first step at which p_t = 1 (None when rate is 0 and base < 1)."""
    if base >= 1.0:
        return 0
    return math.ceil((1.0 - base) / rate) if rate > 0 else None


def draw(seed: int, step: int, micro: int, groups: int, p: float) -> list[bool]:
    """Which groups the successor takes in this micro-batch (True: successor layer g)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63 - 1))
    return (torch.rand(groups, generator=g, dtype=torch.float64) < p).tolist()


def check_group(group: int, teacher_layers: int) -> None:
    if teacher_layers % group:
        raise UsageError(f"theseus: group={group} does not divide the teacher's {teacher_layers} layers "
                         f"(divisors: {', '.join(str(d) for d in range(1, teacher_layers + 1) if teacher_layers % d == 0)})")


def successor_layers(r: Recipe, group: int, teacher_layers: int) -> str | None:
    """The student_layers a Theseus run cuts the successor with: the first layer of each group."""
    check_group(group, teacher_layers)
    if r.student is not None or r.student_layers is not None:
        return r.student_layers
    return ",".join(str(g * group) for g in range(teacher_layers // group))


class Replacement(Scheme):
    method = "theseus"

    def __init__(self, path: str, predecessor: list[nn.Module], group: int, base: float, rate: float, seed: int):
        super().__init__()
        self.path, self.predecessor, self.group = path, predecessor, group
        self.base, self.rate, self.seed = base, rate, seed
        self.groups = len(predecessor) // group

    def forward(self, model, batch, step, micro, run):
        use = draw(self.seed, step, micro, self.groups, probability(step, self.base, self.rate))
        chains = {f"{self.path}.{g}": Chain(self.predecessor[g * self.group:(g + 1) * self.group])
                  for g in range(self.groups) if not use[g]}
        if not chains:
            return run(model)
        with swapped(model, chains):
            return run(model)

    def info(self) -> dict:
        return dict(super().info(), group=self.group, groups=self.groups, base=self.base, rate=self.rate,
                    successor_alone_from_step=steps_to_one(self.base, self.rate))


def setup(r: Recipe, options: dict, pair: pair_mod.Pair, reporter) -> Replacement:
    group, base, rate = int(options["group"]), float(options["base"]), float(options["rate"])
    s_path, s_stack = layers.layer_list(pair.student.model)
    t_path, t_stack = layers.layer_list(pair.teacher.model)
    check_group(group, len(t_stack))
    if len(s_stack) * group != len(t_stack):
        raise UsageError(f"theseus: the successor has {len(s_stack)} layers; with group={group} the teacher's "
                         f"{len(t_stack)} layers need {len(t_stack) // group}")
    if type(s_stack[0]) is not type(t_stack[0]):
        raise UsageError(f"theseus: successor layers ({type(s_stack[0]).__name__}) and predecessor layers "
                         f"({type(t_stack[0]).__name__}) must be of one kind")
    s_cfg, t_cfg = getattr(pair.student.model, "config", None), getattr(pair.teacher.model, "config", None)
    sw, tw = getattr(s_cfg, "hidden_size", None), getattr(t_cfg, "hidden_size", None)
    if sw != tw:
        raise UsageError(f"theseus: successor width {sw} differs from the predecessor's {tw}")
    reach = steps_to_one(base, rate)
    reporter.info(f"theseus: {len(s_stack)} successor layers replace {len(t_stack)} predecessor layers in groups of "
                  f"{group}; p = min(1, {base:g} + {rate:g} t)" + (f", 1 from step {reach}" if reach is not None else ""))
    return Replacement(s_path, list(t_stack), group, base, rate, r.seed)

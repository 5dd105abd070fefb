"""Which scheme a run trains with (scheme.py): the recipe's online method (``dml``, ``one``), its
module-replacement method (``theseus``), or none (one student, a fixed teacher or none).

The methods are entries of the methods registry (``methods: ['dml:peers=3']``, ``tdkd methods``
lists them); a run takes at most one. ``check`` refuses what cannot work before anything is
written; ``setup`` builds the scheme once the pair is loaded.
"""

from __future__ import annotations

from typing import Callable

from .. import registry as methods
from ...io import models, pair as pair_mod
from ...core.errors import UsageError
from ...core.recipe import Recipe
from .base import Scheme

ONLINE = ("dml", "one")  # train without a teacher
REPLACEMENT = ("theseus",)  # the teacher is the predecessor whose layers are replaced


def spec(r: Recipe) -> methods.Spec | None:
    """The run's online or replacement method (at most one), or None."""
    found = [s for s in methods.parse_all(r.methods) if s.method.name in ONLINE + REPLACEMENT]
    if len(found) > 1:
        raise UsageError(f"{found[0].method.name} and {found[1].method.name} are ways to train, not loss terms; "
                         "a run takes one of them")
    return found[0] if found else None


def check(r: Recipe, world: int) -> None:
    """Usage errors of a run's online or replacement method, before anything is written."""
    s = spec(r)
    if s is None:
        return
    name = s.method.name
    if world > 1 and name != "dml":
        raise UsageError(f"{name} does not run under torchrun (several processes) yet; run it in one process")
    if s.weight != 1.0:
        raise UsageError(f"method {s.text!r}: {name} is the whole loss, it takes no weight")
    others = [o.method.name for o in methods.parse_all(r.methods) if o.method.name != name]
    if others:
        raise UsageError(f"{name} trains with its own loss; it cannot be combined with the methods {', '.join(others)}")
    if r.hidden_weight > 0 or r.attention_weight > 0:
        raise UsageError(f"{name} cannot be combined with hidden_weight or attention_weight (set them to 0)")
    teacher = not pair_mod.no_teacher(r.teacher)
    if name in ONLINE:
        if teacher:
            raise UsageError(f"{name} is online distillation: the students teach each other and no teacher is used; "
                             "drop --teacher (or set teacher: none)")
        if r.tensor_lambda > 0:
            raise UsageError(f"{name} has no teacher whose cores the tensor constraint could align to; set tensor_lambda: 0")
        if r.student is None:
            raise UsageError(f"{name} needs a student: pass --student MODEL")
    elif not teacher:
        raise UsageError("theseus replaces the layers of a fine-tuned model: pass it as --teacher (the predecessor)")
    if name == "theseus" and not 0.0 <= s.options["base"] <= 1.0:
        raise UsageError(f"method {s.text!r}: base is a probability, in [0, 1] (got {s.options['base']:g})")
    for key in ("peers", "branches", "layers", "group"):
        if key in s.options and s.options[key] < 1:
            raise UsageError(f"method {s.text!r}: {key} must be at least 1")


def successor_cut(r: Recipe) -> Callable[[models.Loaded], str | None] | None:
    """For theseus: teacher -> the student_layers that cut the successor from it (pair.setup)."""
    s = spec(r)
    if s is None or s.method.name != "theseus":
        return None
    from ...io import layers
    from . import theseus

    return lambda teacher: theseus.successor_layers(r, int(s.options["group"]), layers.num_layers(teacher.model))


def setup(r: Recipe, pair: pair_mod.Pair, num_labels: int, reporter, first_batch: Callable[[], dict]) -> Scheme:
    """The run's scheme; the default (the student alone) when it has no online method."""
    s = spec(r)
    if s is None:
        return Scheme()
    if s.method.name in ONLINE and num_labels < 2:
        raise UsageError(f"{s.method.name} trains classifiers (it needs a task with labels, not regression)")
    if s.method.name == "dml":
        from . import mutual

        return mutual.setup(r, s.options, pair, num_labels, reporter)
    if s.method.name == "one":
        from . import branches

        return branches.setup(r, s.options, pair, num_labels, reporter, first_batch)
    from . import theseus

    return theseus.setup(r, s.options, pair, reporter)

"""How a run trains when it is not one student taught by a fixed teacher: the ``Scheme`` that
online KD (mutual.py: deep mutual learning; branches.py: ONE) and module replacement (theseus.py:
BERT-of-Theseus) implement, and the module swapping they share.

A scheme contributes, to the otherwise unchanged training loop:

    extras        modules trained with the student (other peers, branches, the gate); the optimizer
                  holds their parameters and every full checkpoint their weights, so resume
                  continues all of them
    forward       the student's forward pass in a training step (all peers, all branches, or the
                  student with some of its layers replaced by the teacher's)
    loss_term     the term that stands in for CE and KD (DML, ONE); None keeps the recipe's terms
    members       the models a run can deploy, each the plain architecture (peer-k, branch-b)

Swapping is by attribute: ``swapped(model, {path: module})`` puts other modules at dotted paths for
the length of a ``with`` block and puts the originals back, so the student's own modules, names
and checkpoints never change.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn

from .. import loss_terms


class Scheme:
    """The default: the student alone (subclasses override what they change)."""

    method: str = ""
    replaces_ce: bool = False  # its loss term includes the CE of every member

    def __init__(self) -> None:
        self.extras: dict[str, nn.Module] = {}

    def forward(self, model: nn.Module, batch: dict, step: int, micro: int,
                run: Callable[[nn.Module], loss_terms.Outputs]) -> loss_terms.Outputs:
        """The student's outputs in training step ``step``, micro-batch ``micro``; ``run(model)``
        is one forward pass of a model on the batch."""
        return run(model)

    def loss_term(self) -> tuple[loss_terms.Term, float] | None:
        return None

    def members(self) -> list[str]:
        """Names of the deployable models; empty: the student is the only one."""
        return []

    @contextmanager
    def member(self, model: nn.Module, name: str) -> Iterator[tuple[nn.Module, dict | None]]:
        """(the member as a plain model, its source for the manifest; None: the student's)."""
        yield model, None

    def info(self) -> dict:
        """What run.json records of the scheme."""
        return {"method": self.method, "members": self.members()}


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


@contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """``model`` with the module at each dotted path replaced (ModuleList/Sequential items
    included) for the length of the block; the originals are put back however it ends."""
    old = {}
    try:
        for path, module in replacements.items():
            parent, name = _parent(model, path)
            old[path] = getattr(parent, name)
            setattr(parent, name, module)
        yield model
    finally:
        for path, module in old.items():
            parent, name = _parent(model, path)
            setattr(parent, name, module)


class Replay(nn.Module):
    """Stands in for a module whose output on this batch is already known: returns it, whatever
    it is called with (the trunk of a ONE branch after the first: computed once, shared)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


class Chain(nn.Module):
    """Several layers run one after another in the place of one (BERT-of-Theseus: a group of
    predecessor layers where the successor layer stands). Each layer gets the previous one's
    hidden states and the same other arguments; the last layer's output is returned as is."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden, *args, **kwargs):
        out = hidden
        for layer in self.layers:
            out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        return out

"""ONE, on-the-fly native ensemble (Lan et al., NeurIPS 2018): the top of one student is branched B
times over a shared trunk; a gate over the trunk's output weighs the branches into an ensemble,
and the ensemble teaches every branch as they train (method_losses.one_loss).

    tail     the last ``layers`` blocks (transformer layers, or CNN blocks of the last stages) and
             every module with parameters after them (pooler, final norm, classifier head)
    branch   a copy of the tail: branch 0 is the student's own tail; branch b > 0 is the tail of
             the student loaded again with seed+b (pretrained weights alike, new heads differ;
             random initialisation differs everywhere), MPO when the student is
    trunk    everything before the tail, computed once per batch: branches after the first replay
             the trunk blocks' outputs of branch 0 (scheme.Replay), so all branches read one trunk
             output and its gradient sums theirs
    gate     softmax(Linear(pooled trunk output)) over the branches, zero-initialised (a uniform
             ensemble at the start); pooled = mean over tokens (padding excluded) or positions

The deployed model is the original architecture with one branch's tail in place (members
branch-0..B-1; best/ holds the best on the dev set).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ...io import layers, pair as pair_mod
from .. import loss_terms, method_losses
from ...tensor import tensorize
from ...core.errors import UsageError
from ...core.recipe import Recipe
from .base import Replay, Scheme, swapped


def block_paths(model: nn.Module) -> list[str]:
    """Dotted paths of the model's blocks in order: the transformer layer stack, or for a CNN the
    children of its deepest block containers (Sequential/ModuleList of one non-leaf class)."""
    try:
        path, stack = layers.layer_list(model)
        return [f"{path}.{i}" for i in range(len(stack))]
    except UsageError:
        pass
    mods = dict(model.named_modules())
    containers = [n for n, m in mods.items() if n and _holds_blocks(m)]
    deepest = [c for c in containers if not any(o.startswith(c + ".") for o in containers)]
    return [f"{c}.{k}" for c in deepest for k, _ in mods[c].named_children()]


def _holds_blocks(module: nn.Module) -> bool:
    if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) == 0:
        return False
    children = list(module.children())
    return len({type(c) for c in children}) == 1 and any(True for _ in children[0].children())


def split(model: nn.Module, tail_blocks: int) -> tuple[list[str], list[str]]:
    """(trunk block paths, tail paths): the tail is the last ``tail_blocks`` blocks and the
    top-most modules with parameters registered after them (pooler, norm, head)."""
    blocks = block_paths(model)
    if not blocks:
        raise UsageError(f"one: cannot find the blocks of {type(model).__name__} to branch")
    if not 1 <= tail_blocks < len(blocks):
        raise UsageError(f"one: layers={tail_blocks} must leave a trunk: the model has {len(blocks)} blocks "
                         f"(branch 1..{len(blocks) - 1} of them)")
    names = [n for n, _ in model.named_modules()]
    last = blocks[-1]
    after, seen_last = [], False
    for name in names[names.index(last) + 1:]:
        if name.startswith(last + "."):
            continue
        seen_last = True
        module = model.get_submodule(name)
        if any(name.startswith(a + ".") for a in after) or not any(True for _ in module.parameters()):
            continue
        after.append(name)
    if not seen_last or not after:
        raise UsageError("one: the model has no classifier after its last block to branch")
    return blocks[:-tail_blocks], blocks[-tail_blocks:] + after


def pool(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """(batch, width) summary of a trunk output for the gate."""
    if x.ndim == 4:
        return x.mean((2, 3))
    if x.ndim == 3:
        mask = batch.get("attention_mask")
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
            m = mask.unsqueeze(-1).to(x.dtype)
            return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return x.mean(1)
    return x.flatten(1)


class Branches(Scheme):
    method = "one"
    replaces_ce = True

    def __init__(self, trunk: list[str], tail: list[str], copies: list[list[nn.Module]], gate: nn.Linear,
                 temperature: float, source: dict):
        super().__init__()
        self.trunk, self.tail, self.temperature, self.source = trunk, tail, temperature, source
        self.copies = nn.ModuleList(nn.ModuleList(c) for c in copies)
        self.gate = gate
        self.extras = {"one.branches": self.copies, "one.gate": gate}

    def forward(self, model, batch, step, micro, run):
        recorded, entry = {}, {}
        hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, out, p=p: recorded.__setitem__(p, out))
                 for p in self.trunk]
        hooks.append(model.get_submodule(self.tail[0]).register_forward_pre_hook(lambda m, args: entry.__setitem__("x", args[0])))
        try:
            out = run(model)
        finally:
            for h in hooks:
                h.remove()
        logits = [out.logits]
        for copy in self.copies:
            replay = {p: Replay(recorded[p]) for p in self.trunk}
            with swapped(model, {**dict(zip(self.tail, copy)), **replay}):
                logits.append(run(model).logits)
        x = pool(entry["x"], batch)
        out.members = logits
        out.gate = torch.softmax(self.gate(x.to(self.gate.weight.dtype)).float(), -1)
        return out

    def loss_term(self):
        t = self.temperature
        term = loss_terms.Term("one", "CE of every branch and of the gated ensemble + KL(ensemble || branch) (ONE)",
                               lambda r, teacher: 1.0,
                               lambda s, _t, batch, ctx: method_losses.one_loss(s.members, s.gate, batch["labels"], t))
        return term, 1.0

    def members(self) -> list[str]:
        return [f"branch-{b}" for b in range(len(self.copies) + 1)]

    @contextmanager
    def member(self, model: nn.Module, name: str):
        b = self.members().index(name)
        if b == 0:
            yield model, None
            return
        with swapped(model, dict(zip(self.tail, self.copies[b - 1]))):
            yield model, None

    def info(self) -> dict:
        return dict(super().info(), trunk_blocks=len(self.trunk), tail=self.tail)


def setup(r: Recipe, options: dict, pair: pair_mod.Pair, num_labels: int, reporter, first_batch) -> Branches:
    """Branch the run's student: B-1 more tails (from copies seeded seed+b) and the gate, whose
    width comes from one forward pass (eval mode, no gradients) on ``first_batch()``."""
    n_branches, tail_blocks = int(options["branches"]), int(options["layers"])
    if n_branches < 2:
        raise UsageError(f"one needs at least 2 branches (got {n_branches})")
    model = pair.student.model
    trunk, tail = split(model, tail_blocks)
    copies = []
    for b in range(1, n_branches):
        other = pair_mod.load_peer(r, r.student, r.seed + b, bool(tensorize.mpo_modules(model)), num_labels, reporter)
        copies.append([other.model.get_submodule(p) for p in tail])
    if all(_same(model.get_submodule(p), c) for copy in copies for p, c in zip(tail, copy)):
        reporter.info("one: every branch starts as a copy of the student's tail (its weights and head were loaded); "
                      "they differ only through dropout: initialise at random (init: random) for diverse branches")
    width = _trunk_width(model, tail[0], first_batch, pair.student.family)
    with torch.random.fork_rng(devices=[]):
        gate = nn.Linear(width, n_branches)
    nn.init.zeros_(gate.weight)
    nn.init.zeros_(gate.bias)
    reporter.info(f"one: {n_branches} branches of {len(tail)} modules ({', '.join(tail)}) over a trunk of "
                  f"{len(trunk)} blocks; gate over width {width}")
    return Branches(trunk, tail, copies, gate, float(options["temperature"]), pair.student.source)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trunk_width(model: nn.Module, first_tail: str, first_batch, family: str) -> int:
    seen = {}
    handle = model.get_submodule(first_tail).register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            loss_terms.forward(model, family, first_batch())
    finally:
        handle.remove()
        model.train(was_training)
    x = seen["x"]
    return int(x.shape[1] if x.ndim == 4 else x.shape[-1])


"""Deep mutual learning (Zhang et al., CVPR 2018): a cohort of K students trained together, each
with cross-entropy on the labels plus the KL to the other peers' predictions (method_losses.dml_loss).

Peer 0 is the run's student; peers 1..K-1 are loaded the same way (``pair.load_peer``): K copies of
the student spec seeded seed+k (so randomly initialised peers and new classifier heads differ), or
the specs listed in ``students=A+B+...``; each dense or MPO (``mpo=1+0``, default: the recipe's
``mpo``). Any mix of architectures works as long as they read the same inputs (one tokenizer for
text). Every peer is evaluated; the best is written to best/ and every peer to members/peer-k/.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .. import loss_terms, method_losses
from ...io import models, pair as pair_mod
from ...core.errors import UsageError
from ...core.recipe import Recipe
from .base import Scheme


class Cohort(Scheme):
    method = "dml"
    replaces_ce = True

    def __init__(self, peers: list[models.Loaded], temperature: float, weight: float):
        super().__init__()
        self.peers = peers
        self.temperature, self.weight = temperature, weight
        self.extras = {f"peer-{k}": p.model for k, p in enumerate(peers) if k > 0}

    def forward(self, model, batch, step, micro, run):
        out = run(model)
        out.members = [out.logits] + [run(p.model).logits for p in self.peers[1:]]
        return out

    def loss_term(self):
        t = self.temperature
        term = loss_terms.Term("dml", "sum over peers of CE + mean KL to the other peers (DML)",
                               lambda r, teacher: self.weight,
                               lambda s, _t, batch, ctx: method_losses.dml_loss(s.members, batch["labels"], t))
        return term, self.weight

    def members(self) -> list[str]:
        return [f"peer-{k}" for k in range(len(self.peers))]

    @contextmanager
    def member(self, model: nn.Module, name: str):
        k = self.members().index(name)
        yield (model, None) if k == 0 else (self.peers[k].model, self.peers[k].source)

    def info(self) -> dict:
        return dict(super().info(), peers=[{"name": f"peer-{k}", "model": p.source.get("spec"), "family": p.family}
                                           for k, p in enumerate(self.peers)])


def peer_specs(r: Recipe, options: dict) -> list[tuple[str, bool]]:
    """(model spec, trains in MPO form) of every peer, peer 0 first."""
    listed = [s.strip() for s in (options.get("students") or "").split("+") if s.strip()]
    k = len(listed) or int(options["peers"])
    specs = listed or [r.student] * k
    if k < 2:
        raise UsageError(f"dml needs a cohort of at least 2 peers (got {k}); set peers=K or students=A+B")
    if not listed and r.student is None:
        raise UsageError("dml: no student to copy; pass --student MODEL (or students=A+B in the method)")
    flags = [f.strip() for f in (options.get("mpo") or "").split("+") if f.strip()]
    if flags and len(flags) != k:
        raise UsageError(f"dml: mpo= gives {len(flags)} values for {k} peers (one 1 or 0 per peer, joined by '+')")
    if any(f not in ("0", "1") for f in flags):
        raise UsageError(f"dml: mpo= takes 1 (MPO) or 0 (dense) per peer, joined by '+' (got {options.get('mpo')!r})")
    return [(s, (flags[i] == "1") if flags else r.mpo) for i, s in enumerate(specs)]


def _check_same_inputs(first: models.Loaded, peer: models.Loaded, k: int, spec: str) -> None:
    """Every peer reads the same batch: one tokenizer for text, one input size and normalisation
    for images."""
    why = None
    try:
        pair_mod.check_vocab(first, peer)
    except UsageError as exc:
        why = str(exc).replace("teacher and student", "the peers").replace("teacher is", "peer 0 is").replace("the student", f"peer {k}")
    if why is None and first.family == "timm" and models.image_norm(first.model) != models.image_norm(peer.model):
        why = (f"their inputs differ (size, mean, std {models.image_norm(first.model)} vs "
               f"{models.image_norm(peer.model)})")
    if why:
        raise UsageError(f"dml peer {k} ({spec}) and peer 0 cannot learn from one batch: {why}")


def setup(r: Recipe, options: dict, pair: pair_mod.Pair, num_labels: int, reporter) -> Cohort:
    """The cohort: peer 0 replaces the run's student when its spec or form differs from it."""
    specs = peer_specs(r, options)
    peers = []
    for k, (spec, mpo) in enumerate(specs):
        same = k == 0 and spec == r.student and mpo == r.mpo
        peer = pair.student if same else pair_mod.load_peer(r, spec, r.seed + k, mpo, num_labels, reporter)
        if peers:
            _check_same_inputs(peers[0], peer, k, spec)
        peers.append(peer)
    pair.student = peers[0]
    reporter.info("dml cohort: " + ", ".join(f"peer-{k} {spec} ({'MPO' if mpo else 'dense'})"
                                             for k, (spec, mpo) in enumerate(specs)))
    return Cohort(peers, float(options["temperature"]), 1.0)

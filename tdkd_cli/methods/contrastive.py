"""Contrastive representation distillation (CRD, Tian et al., ICLR 2020).

Each side's feature of an example is pooled to a vector (``pooled``: a CNN map averaged over
positions, a token sequence's first token, a vector as it is), projected by a small linear head to
``feat_dim`` and L2-normalised. Two memory banks hold one embedding per training example, the
student's and the teacher's. For a batch, the student's embedding of example i is scored against
the teacher bank's entry for i (the positive) and for K examples drawn uniformly (the negatives),
and the teacher's embedding against the student bank likewise:

    p(j | v) = exp(<v, m_j> / T) / Z          (Z fixed at the first batch: mean of exp(.) * N)
    L_NCE    = -1/B sum_i [ log h(p_pos) + sum_k log(1 - h(p_neg_k)) ],  h(p) = p / (p + K / N)
    L_CRD    = L_NCE(student vs teacher bank) + L_NCE(teacher vs student bank)

after which each bank's rows of the batch move towards the new embeddings with ``momentum`` and
are normalised again. The teacher's features arrive detached, so gradients reach the student and
both heads only. Banks, the two Z, and the generator that draws negatives are buffers of the
``CRD`` module: they are saved with every checkpoint (a resumed run continues bitwise), live on
the run's device, and are dropped at merge like every connector.

Defaults: feat_dim 128, T 0.07, momentum 0.5 (the paper's). The paper draws 16,384 negatives; tdkd's
default is 1,024, which fits a CPU: a batch of 64 gathers 64 x 1,025 x 128 floats (34 MB) per bank
instead of 0.5 GB; it must be below the number of training examples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pooled(feat: torch.Tensor) -> torch.Tensor:
    """(batch, dim): feature maps averaged over positions, token sequences' first (class) token."""
    if feat.dim() == 4:
        return feat.float().mean(dim=(2, 3))
    if feat.dim() == 3:
        return feat[:, 0].float()
    return feat.float().flatten(1)


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE over ``scores`` (batch, 1 + K): column 0 the positive's p, then the K negatives'."""
    k = scores.shape[1] - 1
    noise = k / n_data
    pos = scores[:, 0]
    log_pos = torch.log(pos / (pos + noise + eps))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


class CRD(nn.Module):
    """Heads, memory banks and normalisers of one CRD pair (see the module docstring)."""

    def __init__(self, s_dim: int, t_dim: int, n_data: int, feat_dim: int = 128, nce_k: int = 1024,
                 temperature: float = 0.07, momentum: float = 0.5, seed: int = 0):
        super().__init__()
        self.n_data, self.k, self.t, self.m = int(n_data), int(nce_k), float(temperature), float(momentum)
        self.head_s, self.head_t = nn.Linear(s_dim, feat_dim), nn.Linear(t_dim, feat_dim)
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("bank_s", torch.rand(n_data, feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("bank_t", torch.rand(n_data, feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # (student side, teacher side); -1: not set yet
        self.register_buffer("rng", g.get_state())

    def negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + K) bank rows: the example itself, then K drawn uniformly (a dedicated
        generator whose state is a buffer, so the global RNG stream is untouched)."""
        g = torch.Generator()
        g.set_state(self.rng.cpu())
        idx = torch.randint(0, self.n_data, (index.shape[0], self.k + 1), generator=g)
        self.rng.copy_(g.get_state())
        idx = idx.to(index.device)
        idx[:, 0] = index
        return idx

    def forward(self, s_feat: torch.Tensor, t_feat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        v_s = F.normalize(self.head_s(pooled(s_feat).to(self.head_s.weight.dtype)), dim=1)
        v_t = F.normalize(self.head_t(pooled(t_feat.detach()).to(self.head_t.weight.dtype)), dim=1)
        idx = self.negatives(index)
        p_s = self._scores(self.bank_t[idx], v_s, 0)  # the student's embedding against the teacher bank
        p_t = self._scores(self.bank_s[idx], v_t, 1)
        loss = nce_loss(p_s, self.n_data) + nce_loss(p_t, self.n_data)
        with torch.no_grad():
            self._update(self.bank_s, index, v_s)
            self._update(self.bank_t, index, v_t)
        return loss

    def _scores(self, rows: torch.Tensor, v: torch.Tensor, side: int) -> torch.Tensor:
        out = torch.exp(torch.bmm(rows.detach(), v.unsqueeze(2)).squeeze(2) / self.t)
        if float(self.z[side]) < 0:  # the normaliser, estimated once from the first batch
            self.z[side] = out.detach().mean() * self.n_data
        return out / self.z[side].clone()  # the buffer changes later in this step: divide by a copy

    def _update(self, bank: torch.Tensor, index: torch.Tensor, v: torch.Tensor) -> None:
        rows = bank[index] * self.m + v.detach() * (1 - self.m)
        bank[index] = F.normalize(rows, dim=1)


def build(s_shape: tuple, t_shape: tuple, options: dict, n_data: int, seed: int) -> CRD:
    return CRD(_dim(s_shape), _dim(t_shape), n_data, int(options["feat_dim"]), int(options["nce_k"]),
               options["temperature"], options["momentum"], seed)


def _dim(shape: tuple) -> int:
    """Width of ``pooled`` of a feature of this shape."""
    if len(shape) == 4:
        return shape[1]
    if len(shape) == 3:
        return shape[2]
    return math.prod(shape[1:])


def check(s_shape: tuple, t_shape: tuple) -> str | None:
    if len(s_shape) < 2 or len(t_shape) < 2:
        return "CRD needs features with a batch dimension and at least one more"
    return None

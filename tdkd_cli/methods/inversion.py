"""Model inversion: the losses that make a trained classifier a source of training inputs
(DeepInversion, Yin et al., CVPR 2020), for data-free distillation (`tdkd synthesize`).

A batch of inputs ``x`` (normalised, as the model reads them) with target classes ``y`` is pulled
towards what the teacher T saw in training by

    L(x) = ce * CE(T(x), y)                                          the teacher's class score
         + bn * sum_l ( ||mu_l(x) - m_l||_2 + ||var_l(x) - v_l||_2 )  BatchNorm statistics
         + tv * TV(x) + l2 * ||x||^2 / B                             image priors
         - div * D(x)                                                 diversity within each class
         + adaptive * (1 - JS(T(x) || S(x)))                          optional: where a student S disagrees

where ``mu_l(x)``, ``var_l(x)`` are the per-channel mean and (biased) variance of the input of
BatchNorm layer l over the batch and its spatial positions, and ``m_l``, ``v_l`` its running
statistics. ``TV`` is the mean squared difference of neighbouring pixels (horizontal and vertical);
``D`` the mean absolute pixel difference between images of the same target class in the batch (a
generator trained without it tends to draw one image per class, whatever its noise); ``JS`` the
Jensen-Shannon divergence of the two softmax distributions (natural log, in [0, ln 2]),
so minimising the last term seeks inputs on which the student and the teacher disagree.

Pure functions of tensors, plus ``BNStatsTap`` (forward pre-hooks on the BatchNorm layers, removed on
``close()``); the synthesis loop is tools/synthesize.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class InversionWeights:
    """Weights of the inversion loss's terms (the formula in the module docstring)."""

    ce: float = 1.0
    bn: float = 0.3
    tv: float = 1.0
    l2: float = 0.0
    div: float = 1.0
    adaptive: float = 0.0


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers (1d/2d/3d, SyncBatchNorm) of ``model`` that keep running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
            and m.running_var is not None]


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a BatchNorm input (B, C, ...) over every other axis."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims)
    var = (x - mean.view(1, -1, *([1] * (x.dim() - 2)))).pow(2).mean(dim=dims)
    return mean, var


def bn_statistics_loss(stats: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum over layers of ||mean - running_mean||_2 + ||var - running_var||_2, from
    (mean, var, running_mean, running_var) per layer."""
    if not stats:
        raise ValueError("no BatchNorm statistics to compare")
    terms = [torch.linalg.vector_norm(m - rm.to(m.dtype)) + torch.linalg.vector_norm(v - rv.to(v.dtype))
             for m, v, rm, rv in stats]
    return torch.stack(terms).sum()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertically and horizontally neighbouring pixels of (B, C, H, W)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
    return dh + dw


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each input, averaged over the batch."""
    return x.pow(2).flatten(1).sum(dim=1).mean()


def diversity(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of images with the same target of their mean absolute difference per element
    (0 when no class has two images)."""
    flat = x.flatten(1)
    total, pairs = flat.new_zeros(()), 0
    for c in torch.unique(targets):
        xc = flat[targets == c]
        if len(xc) < 2:
            continue
        total = total + torch.cdist(xc, xc, p=1).sum() / (2 * flat.shape[1])
        pairs += len(xc) * (len(xc) - 1) // 2
    return total / max(pairs, 1)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of softmax(logits_a) and softmax(logits_b), natural log, averaged
    over the batch: 0.5 KL(p || m) + 0.5 KL(q || m) with m = (p + q) / 2."""
    log_p = F.log_softmax(logits_a.float(), dim=-1)
    log_q = F.log_softmax(logits_b.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


class BNStatsTap:
    """The batch statistics of every BatchNorm layer's input in each forward pass of ``model``:
    ``tap.loss()`` is ``bn_statistics_loss`` of the latest pass. Hooks are removed on ``close()``."""

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._handles = [m.register_forward_pre_hook(self._keeper(name)) for name, m in self.layers]

    def _keeper(self, name: str):
        def hook(module, args):
            mean, var = batch_statistics(args[0].float())
            self._stats[name] = (mean, var, module.running_mean, module.running_var)
        return hook

    def loss(self) -> torch.Tensor:
        return bn_statistics_loss([self._stats[name] for name, _ in self.layers if name in self._stats])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._stats = [], {}

    def __enter__(self) -> "BNStatsTap":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def inversion_loss(teacher: nn.Module, tap: BNStatsTap, x: torch.Tensor, targets: torch.Tensor, w: InversionWeights,
                   student: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(total loss, each term's value) of the batch ``x`` for ``targets`` (module docstring). The
    teacher (and the student) should be in eval mode with their parameters frozen; gradients flow
    to ``x`` only. ``tap`` must watch ``teacher``."""
    logits = teacher(x)
    terms = {"ce": F.cross_entropy(logits.float(), targets), "bn": tap.loss(), "tv": total_variation(x), "l2": l2_prior(x),
             "div": diversity(x, targets)}
    weights = {"ce": w.ce, "bn": w.bn, "tv": w.tv, "l2": w.l2, "div": -w.div}
    if student is not None and w.adaptive > 0:
        terms["adaptive"] = 1.0 - js_divergence(logits, student(x))
        weights["adaptive"] = w.adaptive
    total = sum(weights[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


class ImageGenerator(nn.Module):
    """A small conditional generator (noise z, class y) -> images (B, C, H, W) whose pixels lie in
    [lo, hi] per channel (the teacher's normalised range of [0, 1] pixels).

    ``[z, embedding(y)]`` -> Linear -> (2w, ceil(H/4), ceil(W/4)) -> BN -> 2 x (upsample x2, 3x3 conv, BN,
    LeakyReLU) -> 3x3 conv -> sigmoid scaled to [lo, hi] (cropped to H x W). Trained against
    ``inversion_loss`` of its batches, it amortises the inversion: sampling it costs one forward pass."""

    LATENT, WIDTH = 64, 16

    def __init__(self, num_classes: int, size: tuple[int, int], lo: Sequence[float], hi: Sequence[float],
                 latent: int = LATENT, width: int = WIDTH):
        super().__init__()
        self.latent, self.width, self.size = latent, width, (int(size[0]), int(size[1]))
        self.h0, self.w0 = -(-self.size[0] // 4), -(-self.size[1] // 4)
        self.embed = nn.Embedding(num_classes, latent)
        self.fc = nn.Linear(2 * latent, 2 * width * self.h0 * self.w0)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, len(lo), 3, padding=1))
        self.register_buffer("lo", torch.tensor(list(lo), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("hi", torch.tensor(list(hi), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1)).view(len(z), 2 * self.width, self.h0, self.w0)
        out = self.body(h)[..., :self.size[0], :self.size[1]]
        return self.lo + (self.hi - self.lo) * torch.sigmoid(out)

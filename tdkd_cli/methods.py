"""Distillation methods beyond logit KD, each a named loss term a recipe switches on with
``methods: ["NAME:weight=W,option=value,..."]`` (``--method`` on the command line, repeatable).

A method works with dense and over-parameterized (MPO) students alike and combines with every other
term, the tensor constraint included: it becomes one more entry of the weighted sum in
loss_terms, logged under its own name. Feature and relation methods read the outputs of modules
named by dotted path (``student=`` / ``teacher=``), captured with forward hooks; token features
(batch, tokens, width) and feature maps are flattened per example. Relation methods compare
example-to-example relations, so student and teacher widths may differ.

The formulas are written out in the functions below (the papers' definitions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import loss_terms
from .errors import UsageError


# ----------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): T^2 (alpha * TCKD + beta * NCKD), batch mean.
    TCKD = KL(b_t || b_s) of the binary (target, all other classes) probabilities; NCKD = KL of the
    distributions over the non-target classes alone; all at temperature T."""
    t = temperature
    zs, zt = student_logits.float() / t, teacher_logits.detach().float() / t
    target = F.one_hot(labels, zs.shape[-1]).bool()
    ps, pt = zs.softmax(-1), zt.softmax(-1)
    bs = torch.stack([ps[target], 1 - ps[target]], -1).clamp_min(1e-12)
    bt = torch.stack([pt[target], 1 - pt[target]], -1).clamp_min(1e-12)
    tckd = (bt * (bt.log() - bs.log())).sum(-1).mean()
    log_qs = zs.masked_fill(target, -1e9).log_softmax(-1)
    log_qt = zt.masked_fill(target, -1e9).log_softmax(-1)
    nckd = (log_qt.exp() * (log_qt - log_qs)).masked_fill(target, 0.0).sum(-1).mean()
    return (t * t) * (alpha * tckd + beta * nckd)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): T^2 (beta * inter + gamma * intra) with
    inter = 1 - mean over examples of the Pearson correlation of the softened predictions, and
    intra = 1 - mean over classes of the Pearson correlation across the batch."""
    t = temperature
    ys, yt = (student_logits.float() / t).softmax(-1), (teacher_logits.detach().float() / t).softmax(-1)
    inter = 1 - _pearson_rows(ys, yt).mean()
    intra = 1 - _pearson_rows(ys.T, yt.T).mean()
    return (t * t) * (beta * inter + gamma * intra)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(x.shape[0], -1)


def sp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): ||G_s - G_t||_F^2 / B^2, where G is the
    batch Gram matrix of the flattened features with each row scaled to unit L2 norm."""
    fs, ft = _flat(student_feat), _flat(teacher_feat.detach())
    gs, gt = F.normalize(fs @ fs.T, dim=1), F.normalize(ft @ ft.T, dim=1)
    b = fs.shape[0]
    return ((gs - gt) ** 2).sum() / (b * b)


def _distances(f: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances divided by their mean over distinct pairs."""
    d = torch.cdist(f, f)
    off = ~torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    return d / d[off].mean().clamp_min(1e-12)


def _angles(f: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between examples i and k: <e_ij, e_kj> for unit vectors e_ij = (f_i - f_j)/|.|."""
    e = F.normalize(f.unsqueeze(0) - f.unsqueeze(1), p=2, dim=2)  # e[j, i] = unit(f_i - f_j)
    return torch.bmm(e, e.transpose(1, 2))  # [j, i, k]


def rkd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al., CVPR 2019): Huber loss between the distance-wise potentials
    (pairwise distances over their mean) plus the angle-wise potentials (cosines of the angles
    formed by every triplet) of student and teacher features, weighted."""
    fs, ft = _flat(student_feat), _flat(teacher_feat.detach())
    loss = distance_weight * F.smooth_l1_loss(_distances(fs), _distances(ft))
    return loss + angle_weight * F.smooth_l1_loss(_angles(fs), _angles(ft))


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # response | feature | relation
    paper: str
    options: dict  # option -> (default, help); every method also takes weight
    compute: Callable  # (student Outputs, teacher Outputs, batch, options) -> scalar
    families: str = "text, ViT"  # timm CNNs: once convolutions can be over-parameterized
    features: bool = False  # reads module outputs named by student= / teacher=


def _response(fn, *keys):
    return lambda s, t, batch, o: fn(s.logits, t.logits, *[o[k] for k in keys])


def _relation(fn, *keys):
    return lambda s, t, batch, o: fn(s.features[o["student"]], t.features[o["teacher"]], *[o[k] for k in keys])


_PATHS = {"student": (None, "dotted path of the student module whose output is compared"),
          "teacher": (None, "dotted path of the teacher module paired with it")}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dkd", "response", "Decoupled KD, Zhao et al., CVPR 2022",
           {"alpha": (1.0, "weight of target-class KD"), "beta": (8.0, "weight of non-target-class KD"),
            "temperature": (4.0, "temperature T")},
           lambda s, t, batch, o: dkd_loss(s.logits, t.logits, batch["labels"], o["alpha"], o["beta"], o["temperature"])),
    Method("dist", "response", "DIST, Huang et al., NeurIPS 2022",
           {"beta": (1.0, "weight of the inter-class (per example) relation"),
            "gamma": (1.0, "weight of the intra-class (per class, across the batch) relation"),
            "temperature": (1.0, "temperature T")},
           _response(dist_loss, "beta", "gamma", "temperature")),
    Method("sp", "relation", "Similarity-preserving KD, Tung & Mori, ICCV 2019", dict(_PATHS),
           _relation(sp_loss), features=True),
    Method("rkd", "relation", "Relational KD, Park et al., CVPR 2019",
           dict(_PATHS, distance_weight=(25.0, "weight of the distance-wise potential"),
                angle_weight=(50.0, "weight of the angle-wise potential")),
           _relation(rkd_loss, "distance_weight", "angle_weight"), features=True),
)}


def parse(spec: str) -> tuple[Method, float, dict]:
    """'NAME[:weight=W,option=value,...]' -> (method, weight, options with defaults filled in)."""
    name, _, rest = spec.strip().partition(":")
    method = METHODS.get(name.strip().lower())
    if method is None:
        raise UsageError(f"unknown method {name.strip()!r} in {spec!r}; known: {', '.join(METHODS)} (see `tdkd methods`)")
    opts = {k: d for k, (d, _) in method.options.items()}
    weight = 1.0
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or (key != "weight" and key not in opts):
            known = ", ".join(["weight", *opts])
            raise UsageError(f"method {spec!r}: expected option=value with an option of {method.name} ({known}), got {item!r}")
        if key in ("student", "teacher"):
            opts[key] = value.strip()
            continue
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"method {spec!r}: {key} must be a number (got {value.strip()!r})") from None
        if not math.isfinite(number) or number < 0:
            raise UsageError(f"method {spec!r}: {key} must be a finite number >= 0 (got {value.strip()!r})")
        if key == "weight":
            weight = number
        else:
            opts[key] = number
    if "temperature" in opts and opts["temperature"] <= 0:
        raise UsageError(f"method {spec!r}: temperature must be positive")
    missing = [k for k in ("student", "teacher") if method.features and not opts.get(k)]
    if missing:
        raise UsageError(f"method {spec!r}: {method.name} needs {' and '.join(f'{k}=MODULE' for k in missing)} "
                         "(dotted module paths, e.g. student=bert.pooler,teacher=bert.pooler)")
    return method, weight, opts


def terms(specs) -> list[tuple[loss_terms.Term, float]]:
    """(term, weight) per method spec of a recipe, as loss_terms entries that need the teacher."""
    out, seen = [], set()
    for spec in specs or ():
        method, weight, opts = parse(spec)
        if method.name in seen:
            raise UsageError(f"method {method.name} is given twice; combine its options in one --method")
        seen.add(method.name)
        paths = (lambda r, o=opts: ([o["student"]], [o["teacher"]])) if method.features else None
        term = loss_terms.Term(method.name, method.paper, lambda r, t, w=weight: w if t else 0.0,
                               lambda s, t, batch, ctx, m=method, o=opts: m.compute(s, t, batch, o),
                               frozenset({"teacher"}), modules=paths)
        if weight > 0:
            out.append((term, weight))
    return out


# the loss terms recipes switch on with their own keys (loss_terms.TERMS), for `tdkd methods`
BUILTIN = (
    ("kd", "response", "Hinton et al., 2015 (logit KD)", "alpha, temperature", "text, ViT"),
    ("ce", "-", "cross-entropy on the labels (weight 1 - alpha)", "alpha", "text, ViT"),
    ("hidden", "feature", "TinyBERT hidden-state MSE, Jiao et al., 2020", "hidden_weight, layer_map", "text"),
    ("attention", "feature", "TinyBERT attention-map MSE, Jiao et al., 2020", "attention_weight, layer_map", "text"),
    ("tensor", "OPDF", "tensor constraint, Zhan et al., NeurIPS 2024", "tensor_lambda, layer_map", "text, ViT"),
)


def catalogue() -> list[dict]:
    """Every loss a recipe can use: the built-in terms and the methods, with options and defaults."""
    rows = [{"name": n, "kind": k, "paper": p, "recipe": keys, "families": fam, "options": {}} for n, k, p, keys, fam in BUILTIN]
    for m in METHODS.values():
        rows.append({"name": m.name, "kind": m.kind, "paper": m.paper, "families": m.families,
                     "recipe": f"methods: ['{m.name}:weight=1{',student=MODULE,teacher=MODULE' if m.features else ''}']",
                     "options": {k: {"default": d, "help": h} for k, (d, h) in m.options.items()}})
    return rows

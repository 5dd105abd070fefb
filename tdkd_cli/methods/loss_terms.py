"""Loss terms as data: a registry of named, weighted terms that the training loop sums.

A term declares what it needs (the teacher's outputs, hidden states, attention maps, the MPO
cores) and returns a scalar; its weight comes from the recipe. The loop computes what the active
terms need, sums ``weight * value`` in registry order, and logs each term under its name (the keys
of metrics.jsonl). Batch terms run on every micro-batch; step terms (the tensor constraint, which
reads only the cores) run once per optimizer step.

    total = sum over active terms of weight(recipe) * term(student, teacher, batch, context)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import losses
from ..core.recipe import Recipe
from ..tensor.constraint import tensor_constraint_loss


@dataclass
class Outputs:
    """One model's forward pass: logits, and what the active terms asked for."""

    logits: torch.Tensor
    hidden: tuple | None = None  # HF hidden states (embeddings first)
    attentions: tuple | None = None  # HF attention probabilities per layer
    features: dict = field(default_factory=dict)  # module path -> output (features.FeatureTap)
    members: list | None = None  # logits of every peer / branch (online schemes, scheme.py)
    gate: torch.Tensor | None = None  # ONE: gate weights (batch, branches)


@dataclass
class Context:
    """What terms read besides the batch: settings, the layer pairing, connectors, cores."""

    temperature: float = 1.0
    pair_map: list[tuple[int, int]] = field(default_factory=list)  # (student layer, teacher layer)
    connectors: dict[str, nn.Module] = field(default_factory=dict)  # trained with the student, dropped at merge
    student_cores: dict = field(default_factory=dict)
    teacher_cores: dict = field(default_factory=dict)
    core_pairs: list = field(default_factory=list)


@dataclass(frozen=True)
class Term:
    name: str
    description: str
    weight: Callable[[Recipe, bool], float]  # (recipe, has_teacher) -> weight; 0 switches the term off
    compute: Callable[["Outputs | None", "Outputs | None", "dict | None", Context], torch.Tensor]
    needs: frozenset = frozenset()  # of "teacher", "hidden", "attentions"
    per_step: bool = False  # once per optimizer step (on the cores), not per micro-batch
    # (student module paths, teacher module paths) whose outputs the term reads from Outputs.features
    modules: Callable[[Recipe], tuple[list[str], list[str]]] | None = None


def forward(model: nn.Module, family: str, batch: dict, needs: frozenset = frozenset()) -> Outputs:
    """One forward pass as Outputs: a timm model takes images, an HF model token ids (and returns
    hidden states / attention maps when the terms need them), a graph model (PyG) the whole graph
    and gives the logits of the batch's ``nodes`` (engine/graph_batch.py)."""
    if family == "timm":
        return Outputs(model(batch["x"]))
    if family == "pyg":
        return Outputs(_graph_forward(model, batch))
    hidden, attn = "hidden" in needs, "attentions" in needs
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    res = model(**kwargs, output_hidden_states=hidden or None, output_attentions=attn or None)
    return Outputs(res.logits, res.hidden_states if hidden else None, res.attentions if attn else None)


def _graph_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    from ..io import graph_models

    x = batch["x"]
    if model.training:  # dropout on the input features too, as Kipf & Welling's GCN
        x = graph_models.feature_dropout(x, graph_models.input_dropout(model), batch.get("x_nonzero"))
    return graph_models.forward(model, x, batch["edge_index"])[batch["nodes"]]


def _kd(s, t, batch, ctx):
    return losses.kd_loss(s.logits, t.logits, ctx.temperature)


def _ce(s, t, batch, ctx):
    return losses.ce_loss(s.logits, batch["labels"])


def _hidden(s, t, batch, ctx):
    # index 0 is the embedding output: layer i's output is hidden[i + 1]
    return losses.hidden_mse(s.hidden[1:], t.hidden[1:], ctx.pair_map, ctx.connectors.get("projection"),
                             batch.get("attention_mask"))


def _attention(s, t, batch, ctx):
    return losses.attention_mse(s.attentions, t.attentions, ctx.pair_map)


def _tensor(s, t, batch, ctx):
    return tensor_constraint_loss(ctx.student_cores, ctx.teacher_cores, ctx.core_pairs)


TERMS: dict[str, Term] = {t.name: t for t in (
    Term("kd", "T^2 KL(p_teacher || p_student) of the logits at temperature T",
         lambda r, teacher: r.alpha if teacher else 0.0, _kd, frozenset({"teacher"})),
    Term("ce", "cross-entropy on the labels (MSE for regression tasks)",
         lambda r, teacher: 1.0 - r.alpha if teacher else 1.0, _ce),
    Term("hidden", "MSE of hidden states, student layer i vs its layer-map partner (projected when widths differ)",
         lambda r, teacher: r.hidden_weight, _hidden, frozenset({"teacher", "hidden"})),
    Term("attention", "MSE of attention maps, student layer i vs its layer-map partner",
         lambda r, teacher: r.attention_weight, _attention, frozenset({"teacher", "attentions"})),
    Term("tensor", "OPDF tensor constraint: MSE of the student's auxiliary MPO cores to the teacher's",
         lambda r, teacher: r.tensor_lambda if teacher else 0.0, _tensor, per_step=True),
)}

# metrics.jsonl keys of a training log record, in order
LOG_KEYS = ("loss", *TERMS, "grad_norm")


def log_keys(terms: list[tuple[Term, float]] = ()) -> tuple[str, ...]:
    """metrics.jsonl keys: LOG_KEYS of the registry as it is now, plus any other active term's name
    (methods.py terms) before grad_norm."""
    extra = [t.name for t, _ in terms if t.name not in TERMS]
    return ("loss", *TERMS, *extra, "grad_norm")


def feature_paths(terms: list[tuple[Term, float]], r: Recipe) -> tuple[list[str], list[str]]:
    """Module paths the active terms read, on the student and on the teacher (each once, in order)."""
    s_paths, t_paths = [], []
    for term, _ in terms:
        if term.modules is not None:
            s, t = term.modules(r)
            s_paths += [p for p in s if p not in s_paths]
            t_paths += [p for p in t if p not in t_paths]
    return s_paths, t_paths


def active(r: Recipe, has_teacher: bool) -> list[tuple[Term, float]]:
    """(term, weight) of every term with a positive weight, in registry order."""
    out = []
    for term in TERMS.values():
        w = term.weight(r, has_teacher)
        if w > 0:
            out.append((term, w))
    return out


def needs(terms: list[tuple[Term, float]], per_step: bool = False) -> frozenset:
    """Union of what the batch terms (or the step terms) need."""
    out = frozenset()
    for term, _ in terms:
        if term.per_step == per_step:
            out |= term.needs
    return out

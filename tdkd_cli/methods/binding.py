"""Binding a run's methods to its models (once, before the run directory is written): paths are
expanded (``+`` joins pairs, ``*`` pairs the layers of the layer map) and resolved, one forward pass
on the first batch gives the feature shapes, each pair is checked (one error naming both modules and
shapes), and connectors (FitNets' projections, layout connectors) and the state of stateful methods
(CRD's heads and memory banks) are built. The result is loss terms with weights (loss_terms.Term)
and the modules that train beside the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import connectors, contrastive, loss_terms
from .registry import TRAINING_SCHEMES, Shape, Spec, graph_rows, parse_all
from ..core.errors import UsageError


def expand_pairs(spec: Spec, layer_map: list[int] | None, s_names=(), t_names=()) -> list[tuple[str, str]]:
    """(student path, teacher path) pairs of a feature method: '+' joins pairs; '*' stands for the
    numbers of the modules that match (``s_names``/``t_names``: the models' module names), the
    student's i-th paired with its layer-map partner: the run's layer map for its layer stack,
    otherwise the uniform map over the numbers found (CNN stages: layer1..layer4, stages.0..3)."""
    s_items = [p.strip() for p in spec.options["student"].split("+")]
    t_items = [p.strip() for p in spec.options["teacher"].split("+")]
    if len(s_items) != len(t_items) or not all(s_items + t_items):
        raise UsageError(f"method {spec.text!r}: student= and teacher= must name the same number of modules "
                         f"(got {len(s_items)} and {len(t_items)})")
    pairs = []
    for s, t in zip(s_items, t_items):
        if ("*" in s) != ("*" in t):
            raise UsageError(f"method {spec.text!r}: '*' must appear in both paths of a pair ({s!r}, {t!r})")
        if "*" not in s:
            pairs.append((s, t))
            continue
        s_num, t_num = _numbers(s, s_names), _numbers(t, t_names)
        if layer_map and s_num == list(range(len(layer_map))) and max(layer_map) < len(t_num) == t_num[-1] + 1:
            partners = layer_map
        elif s_num and t_num:
            partners = [t_num[j] for j in _uniform(len(s_num), len(t_num))]
        else:
            side = "student" if not s_num else "teacher"
            raise UsageError(f"method {spec.text!r}: no {side} module matches {s if not s_num else t!r}")
        pairs += [(s.replace("*", str(i)), t.replace("*", str(j))) for i, j in zip(s_num, partners)]
    return pairs


def _numbers(pattern: str, names) -> list[int]:
    """Sorted numbers that '*' takes in the module names matching ``pattern``."""
    import re

    rx = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + r"$")
    return sorted({int(m.group(1)) for m in map(rx.match, names) if m})


def _uniform(n_student: int, n_teacher: int) -> list[int]:
    from ..io.layers import layer_map

    return layer_map(None, n_student, n_teacher)


def _attention_parts(model: nn.Module, path: str, role: str, spec: Spec) -> tuple[list[str], int | None]:
    """The projection paths of an attention module (query/key/value children, or one fused qkv)
    and its own head count."""
    from .features import resolve_paths

    module = resolve_paths(model, [path], role)[path]
    children = dict(module.named_children())
    heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
    if all(k in children for k in ("query", "key", "value")):
        return [f"{path}.query", f"{path}.key", f"{path}.value"], heads
    if "qkv" in children:
        return [f"{path}.qkv"], heads
    raise UsageError(f"method {spec.text!r}: {role} module {path!r} ({type(module).__name__}) has no query/key/value "
                     "or qkv projections; name an attention module (e.g. bert.encoder.layer.0.attention.self or blocks.0.attn)")


@dataclass
class Bound:
    """A run's methods bound to its models: loss terms with weights, and the connectors they train."""

    terms: list = field(default_factory=list)  # (loss_terms.Term, weight)
    connectors: dict = field(default_factory=dict)  # name -> nn.Module
    notes: list = field(default_factory=list)  # one line per connector, for the run summary


def bind(specs, student: nn.Module, teacher: nn.Module | None, layer_map: list[int] | None,
         probe: Callable[[list[str], list[str]], tuple[dict, dict]], seed: int = 0,
         n_examples: int | None = None, batch_size: int | None = None) -> Bound:
    """Resolve every method of ``specs`` against the models. ``probe(student paths, teacher paths)``
    returns the output shapes of those modules on one batch (of ``batch_size`` examples). Connectors
    and the state of stateful methods (CRD's banks, one row per of the ``n_examples`` training
    examples) are created with ``seed`` (the same on every run and resume)."""
    bound = Bound()
    feature_specs = []
    for spec in parse_all(specs):
        if spec.method.kind in TRAINING_SCHEMES:
            continue  # online.setup builds these
        if not spec.method.features:
            if spec.weight > 0:
                bound.terms.append((_response_term(spec), spec.weight))
            continue
        feature_specs.append((spec, _feature_pairs(spec, student, teacher, layer_map)))
    if not feature_specs:
        return bound
    s_paths = [p for _, pairs in feature_specs for ps, _ in pairs for p in ps]
    t_paths = [p for _, pairs in feature_specs for _, pt in pairs for p in pt]
    s_shapes, t_shapes = probe(list(dict.fromkeys(s_paths)), list(dict.fromkeys(t_paths)))
    torch.manual_seed(seed)
    for spec, pairs in feature_specs:
        extra = _check_pairs(spec, pairs, s_shapes, t_shapes, student, teacher)
        if spec.method.state is not None:
            _check_state(spec, pairs, s_shapes, n_examples, batch_size)
        conns = []
        for k, (ps, pt) in enumerate(pairs):
            conn = _connector(spec, s_shapes[ps[0]], t_shapes[pt[0]], n_examples, seed + k)
            if conn is not None:
                name = f"{spec.method.name}.{k}"
                bound.connectors[name] = conn
                bound.notes.append(f"{name}: {_describe(conn)} from {ps[0]} to {pt[0]}")
            conns.append(conn)
        if spec.weight > 0:
            bound.terms.append((_feature_term(spec, pairs, conns, extra), spec.weight))
    return bound


def _connector(spec: Spec, s: Shape, t: Shape, n_examples: int | None, seed: int) -> nn.Module | None:
    if spec.method.state is not None:
        return spec.method.state(s, t, spec.options, n_examples, seed)
    return spec.method.connector(s, t) if spec.method.connector else None


def _check_state(spec: Spec, pairs, s_shapes: dict, n_examples: int | None, batch_size: int | None) -> None:
    """A stateful method (CRD) keeps a row per training example and reads the batch's indices."""
    name = spec.method.name
    if n_examples is None:
        raise UsageError(f"method {name} keeps a memory bank of the training examples: use it in tdkd distill")
    for ps, _ in pairs:
        if batch_size is not None and s_shapes[ps[0]][0] != batch_size:
            raise UsageError(f"method {name}: module {ps[0]} gives {list(s_shapes[ps[0]])} for a batch of {batch_size}: "
                             "it has no batch dimension (choose a module whose output has one row per example)")
    k = int(spec.options.get("nce_k", 0))
    if k >= n_examples:
        raise UsageError(f"method {name}: nce_k={k} negatives need more training examples than that "
                         f"(this run has {n_examples}); lower nce_k")


def _feature_pairs(spec: Spec, student, teacher, layer_map) -> list[tuple[list[str], list[str]]]:
    pairs = expand_pairs(spec, layer_map, [n for n, _ in student.named_modules()], [n for n, _ in teacher.named_modules()])
    if spec.method.name != "minilm":
        return [([s], [t]) for s, t in pairs]
    return [(_attention_parts(student, s, "student", spec)[0], _attention_parts(teacher, t, "teacher", spec)[0])
            for s, t in pairs]


def _check_pairs(spec: Spec, pairs, s_shapes: dict, t_shapes: dict, student, teacher):
    """One clear error for a pair that cannot be compared; MiniLM's relation heads per pair."""
    heads = []
    for ps, pt in pairs:
        s, t = s_shapes[ps[0]], t_shapes[pt[0]]
        why = spec.method.check(s, t) if spec.method.check else None
        if s[0] != t[0]:
            why = "the two modules see different batch sizes"
        if spec.method.name == "minilm":
            why, h = _minilm_heads(spec, ps, pt, s, t, student, teacher)
            heads.append(h)
        if why:
            raise UsageError(f"method {spec.method.name}: cannot compare student {ps[0]} {list(s)} with teacher {pt[0]} "
                             f"{list(t)}: {why}")
    return heads


def _minilm_heads(spec: Spec, ps, pt, s: Shape, t: Shape, student, teacher) -> tuple[str | None, tuple[int, int]]:
    if len(s) != 3 or len(t) != 3:
        return "MiniLM needs token projections (batch, tokens, width)", (0, 0)
    if s[1] != t[1]:
        return "MiniLM needs the same number of tokens on both sides", (0, 0)
    n = int(spec.options["heads"])
    if n:
        hs = ht = n
    else:
        hs = _attention_parts(student, ps[0].rsplit(".", 1)[0], "student", spec)[1]
        ht = _attention_parts(teacher, pt[0].rsplit(".", 1)[0], "teacher", spec)[1]
        if not hs or not ht or hs != ht:
            return f"their head counts differ ({hs} and {ht}); set heads=H to compare H relation heads", (0, 0)
    ws, wt = s[2] // (3 if len(ps) == 1 else 1), t[2] // (3 if len(pt) == 1 else 1)
    if ws % hs or wt % ht:
        return f"widths {ws} and {wt} do not split into {hs} heads", (0, 0)
    return None, (hs, ht)


def _describe(conn: nn.Module) -> str:
    if isinstance(conn, connectors.LayoutConnector):
        return (f"{'feature map -> tokens' if conn.to_tokens else 'tokens -> feature map'} "
                f"({conn.grid}x{conn.grid} grid), {_describe(conn.proj)}")
    if isinstance(conn, contrastive.CRD):
        return (f"CRD heads {conn.head_s.in_features}/{conn.head_t.in_features} -> {conn.head_s.out_features}, "
                f"memory banks 2 x {conn.n_data} x {conn.head_s.out_features}, {conn.k} negatives")
    if isinstance(conn, nn.Conv2d):
        return f"1x1 Conv2d {conn.in_channels} -> {conn.out_channels}"
    return f"Linear {conn.in_features} -> {conn.out_features}"


def _response_term(spec: Spec) -> loss_terms.Term:
    m, o, w = spec.method, spec.options, spec.weight
    return loss_terms.Term(m.name, m.paper, lambda r, t: w if t else 0.0,
                           lambda s, t, batch, ctx: m.compute(s, t, batch, o), frozenset({"teacher"}))


def _feature_term(spec: Spec, pairs, conns, heads) -> loss_terms.Term:
    m, o, w = spec.method, spec.options, spec.weight
    s_paths = list(dict.fromkeys(p for ps, _ in pairs for p in ps))
    t_paths = list(dict.fromkeys(p for _, pt in pairs for p in pt))

    def compute(s, t, batch, ctx):
        total = 0.0
        for k, (ps, pt) in enumerate(pairs):
            sf, tf = [s.features[p] for p in ps], [t.features[p] for p in pt]
            if m.kind != "graph":  # graph methods (LSP) read every node's neighbours
                sf, tf = graph_rows(sf, tf, batch, m.kind == "relation")
            total = total + m.compute(sf, tf, batch, o, heads[k] if m.name == "minilm" else conns[k])
        return total / len(pairs)

    return loss_terms.Term(m.name, m.paper, lambda r, t: w if t else 0.0, compute, frozenset({"teacher"}),
                           modules=lambda r: (s_paths, t_paths))

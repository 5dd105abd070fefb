"""Distillation methods beyond logit KD, each a named loss term a recipe switches on with
``methods: ["NAME:weight=W,option=value,..."]`` (``--method`` on the command line, repeatable).

A method works with dense and over-parameterized (MPO) students alike and combines with every other
term, the tensor constraint included: it becomes one more entry of the weighted sum in
loss_terms, logged under its own name. The formulas are method_losses.py's.

Feature and relation methods read the outputs of modules named by dotted path, captured with
forward hooks: ``student=PATH,teacher=PATH``. Several pairs are joined with ``+``
(``student=a+b,teacher=c+d``; the loss is their mean), and ``*`` pairs the layers of the run's
layer map (``student=bert.encoder.layer.*,teacher=bert.encoder.layer.*`` compares student layer i
with teacher layer g(i)). A run binds its methods to the models once (``bind``): paths are
expanded and resolved, one forward pass on the first batch gives the feature shapes, shapes are
checked and connectors (FitNets) are built, all before the run directory is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import connectors, contrastive, loss_terms
from . import method_losses as ml
from ..core.errors import UsageError

Shape = tuple


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # response | feature | relation | contrastive | graph
    paper: str
    options: dict  # option -> (default, help); every method also takes weight
    # response methods: (student Outputs, teacher Outputs, batch, options) -> scalar
    # feature methods: (student features, teacher features, batch, options, connector) -> scalar, per pair
    compute: Callable
    families: str = "text, ViT, CNN"  # model families it works on (dense or MPO students alike)
    features: bool = False  # reads module outputs named by student= / teacher=
    check: Callable[[Shape, Shape], str | None] | None = None  # why a pair of feature shapes cannot be compared
    connector: Callable[[Shape, Shape], nn.Module | None] | None = None  # built when the shapes need one
    # a module with state of its own (heads, memory banks): (student shape, teacher shape, options,
    # training examples, seed) -> module; trained and saved like a connector, dropped at merge
    state: Callable[[Shape, Shape, dict, int, int], nn.Module] | None = None


def _response(fn, *keys):
    return lambda s, t, batch, o: fn(s.logits, t.logits, *[o[k] for k in keys])


def _pairwise(fn, *keys):
    return lambda sf, tf, batch, o, conn: fn(sf[0], tf[0], *[o[k] for k in keys])


def _token_mask(feat: torch.Tensor, batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return mask if mask is not None and feat.ndim == 3 and feat.shape[:2] == mask.shape else None


def _fitnet(sf, tf, batch, o, conn):
    s = sf[0] if conn is None else apply_connector(conn, sf[0])
    t = conn.teacher_view(tf[0]) if isinstance(conn, connectors.LayoutConnector) else tf[0]
    return ml.fitnet_loss(s, t, _token_mask(t, batch))


def apply_connector(conn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conn(x.to(next(conn.parameters()).dtype))


def _fitnet_check(s: Shape, t: Shape) -> str | None:
    if {len(s), len(t)} == {3, 4}:  # a CNN and a ViT: layouts are brought together (connectors.py)
        return connectors.layout_check(s, t)
    if len(s) != len(t) or len(s) not in (2, 3, 4):
        return "FitNets compares vectors, token features or feature maps of the same rank (or tokens with maps)"
    if len(s) == 4 and s[2:] != t[2:]:
        return "feature maps of FitNets need the same height and width"
    if len(s) == 3 and s[1] != t[1]:
        return "token features of FitNets need the same number of tokens"
    return None


def linear_connector(s: Shape, t: Shape) -> nn.Module | None:
    if len(s) != len(t):
        return connectors.LayoutConnector(s, t)
    if len(s) == 4:
        return nn.Conv2d(s[1], t[1], kernel_size=1) if s[1] != t[1] else None
    return nn.Linear(s[-1], t[-1]) if s[-1] != t[-1] else None


def _at_check(s: Shape, t: Shape) -> str | None:
    if len(s) not in (3, 4) or len(t) != len(s):
        return "attention transfer needs token features or feature maps (with positions) on both sides"
    positions = (lambda x: x[1] if len(x) == 3 else x[2:])
    if positions(s) != positions(t):
        return "attention transfer needs the same positions (tokens, or height and width) on both sides"
    return None


def _minilm(sf, tf, batch, o, heads):
    qs, ks, vs = sf[0].chunk(3, -1) if len(sf) == 1 else sf
    qt, kt, vt = tf[0].chunk(3, -1) if len(tf) == 1 else tf
    mask = _token_mask(qs, batch)
    loss = qs.new_zeros((), dtype=torch.float32)
    if o["attention_weight"] > 0:
        loss = loss + o["attention_weight"] * ml.relation_kl((qs, ks), (qt, kt), heads, mask)
    if o["value_weight"] > 0:
        loss = loss + o["value_weight"] * ml.relation_kl((vs, vs), (vt, vt), heads, mask)
    return loss


def _lsp(sf, tf, batch, o, conn):
    if "edge_index" not in batch:
        raise UsageError("method lsp compares each node's neighbours: it needs graph data (--data builtin:cora, ...)")
    kernel = (o["kernel"] or "rbf").strip().lower()
    if kernel not in ("rbf", "linear", "poly"):
        raise UsageError(f"method lsp: kernel must be rbf, linear or poly (got {kernel!r})")
    return ml.lsp_loss(sf[0], tf[0], batch["edge_index"], kernel)


def graph_rows(sf: list, tf: list, batch: dict, relation: bool) -> tuple[list, list]:
    """On a graph batch (engine/graph_batch.py), the rows of the nodes the loss reads; a relation
    method then compares GRAPH_RELATION_NODES of them drawn at random (RKD's angles cost nodes^3),
    from torch's generator, which checkpoints restore. Other batches: unchanged."""
    if "edge_index" not in batch or sf[0].shape[0] != batch["x"].shape[0]:
        return sf, tf
    rows = batch["nodes"]
    if relation and rows.numel() > GRAPH_RELATION_NODES:
        rows = rows[torch.randperm(rows.numel(), device=rows.device)[:GRAPH_RELATION_NODES]]
    return [f[rows] for f in sf], [f[rows] for f in tf]


GRAPH_RELATION_NODES = 512

FEATURE_PATHS = {"student": (None, "student module(s): dotted paths joined by '+', '*' = each layer of the layer map"),
          "teacher": (None, "teacher module(s) paired with them, in the same order")}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dkd", "response", "Decoupled KD, Zhao et al., CVPR 2022",
           {"alpha": (1.0, "weight of target-class KD"), "beta": (8.0, "weight of non-target-class KD"),
            "temperature": (4.0, "temperature T")},
           lambda s, t, batch, o: ml.dkd_loss(s.logits, t.logits, batch["labels"], o["alpha"], o["beta"], o["temperature"])),
    Method("dist", "response", "DIST, Huang et al., NeurIPS 2022",
           {"beta": (1.0, "weight of the inter-class (per example) relation"),
            "gamma": (1.0, "weight of the intra-class (per class, across the batch) relation"),
            "temperature": (1.0, "temperature T")},
           _response(ml.dist_loss, "beta", "gamma", "temperature")),
    Method("fitnet", "feature", "Hints (FitNets), Romero et al., ICLR 2015", dict(FEATURE_PATHS),
           _fitnet, features=True, check=_fitnet_check, connector=linear_connector),
    Method("at", "feature", "Attention transfer, Zagoruyko & Komodakis, ICLR 2017",
           dict(FEATURE_PATHS, p=(2.0, "exponent p of the attention map sum_c |F_c|^p")),
           _pairwise(ml.at_loss, "p"), features=True, check=_at_check),
    Method("minilm", "feature", "MiniLM self-attention and value relations, Wang et al., NeurIPS 2020",
           dict(student=(None, "student attention module(s) (with query/key/value or qkv projections), '+'/'*' as above"),
                teacher=(None, "teacher attention module(s) paired with them"),
                heads=(0.0, "relation heads; 0 = the attention modules' own head count (must then be equal)"),
                attention_weight=(1.0, "weight of the attention-distribution KL (queries x keys)"),
                value_weight=(1.0, "weight of the value-relation KL (values x values)")),
           _minilm, features=True, families="text, ViT"),
    Method("sp", "relation", "Similarity-preserving KD, Tung & Mori, ICCV 2019", dict(FEATURE_PATHS),
           _pairwise(ml.sp_loss), features=True),
    Method("rkd", "relation", "Relational KD, Park et al., CVPR 2019",
           dict(FEATURE_PATHS, distance_weight=(25.0, "weight of the distance-wise potential"),
                angle_weight=(50.0, "weight of the angle-wise potential")),
           _pairwise(ml.rkd_loss, "distance_weight", "angle_weight"), features=True),
    Method("crd", "contrastive", "Contrastive representation distillation, Tian et al., ICLR 2020",
           dict(student=(None, "student module(s) whose output is embedded (CNN map: pooled; tokens: the first)"),
                teacher=(None, "teacher module(s) paired with them"),
                feat_dim=(128.0, "embedding width of both heads"),
                nce_k=(1024.0, "negatives per example (the paper: 16,384); must be below the training examples"),
                temperature=(0.07, "temperature T of the NCE scores"),
                momentum=(0.5, "momentum of the memory-bank update")),
           lambda sf, tf, batch, o, crd: crd(sf[0], tf[0], batch["index"]), features=True, check=contrastive.check,
           state=contrastive.build),
    Method("cc", "relation", "Correlation congruence, Peng et al., ICCV 2019",
           dict(FEATURE_PATHS, gamma=(0.4, "Gaussian kernel width gamma"), order=(2.0, "order P of the kernel's Taylor series")),
           _pairwise(ml.cc_loss, "gamma", "order"), features=True),
    Method("lsp", "graph", "Local structure preserving (LSP), Yang et al., CVPR 2020",
           dict(student=(None, "student node-embedding module(s), e.g. convs.0 (a GNN layer's output)"),
                teacher=(None, "teacher module(s) paired with them"),
                kernel=(None, "similarity kernel: rbf (default: -||z_i - z_j||^2), linear or poly ((z_i.z_j + 1)^2)")),
           _lsp, features=True, families="graph (PyG)"),
    # ways to train rather than loss terms (online.py): at most one per run, never bound as a term
    Method("dml", "online", "Deep mutual learning, Zhang et al., CVPR 2018",
           {"peers": (2.0, "cohort size K: copies of the student, peer k seeded seed+k"),
            "students": (None, "the peers' models joined by '+' instead (peer 0 first)"),
            "mpo": (None, "per peer 1 (MPO) or 0 (dense), joined by '+' (default: the recipe's mpo for all)"),
            "temperature": (1.0, "temperature T of the KL between peers")},
           None, families="text, ViT, CNN; no teacher"),
    Method("one", "online", "ONE, on-the-fly native ensemble, Lan et al., NeurIPS 2018",
           {"branches": (3.0, "branches B over the shared trunk"),
            "layers": (1.0, "last blocks in each branch (transformer layers or CNN blocks), with the head"),
            "temperature": (3.0, "temperature T of KL(ensemble || branch)")},
           None, families="text, ViT, CNN; no teacher"),
    Method("theseus", "replacement", "BERT-of-Theseus, Xu et al., EMNLP 2020",
           {"group": (2.0, "predecessor (teacher) layers each successor layer replaces"),
            "base": (0.3, "replacement probability at step 0"),
            "rate": (0.001, "growth of the probability per step: p_t = min(1, base + rate * t)")},
           None, families="text, ViT (layer stacks); teacher = predecessor"),
)}

# methods that are a way to train (online.py), not a loss term added to the sum
TRAINING_SCHEMES = ("online", "replacement")


@dataclass(frozen=True)
class Spec:
    method: Method
    weight: float
    options: dict
    text: str


def parse(spec: str) -> Spec:
    """'NAME[:weight=W,option=value,...]' -> Spec (options with defaults filled in)."""
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
        if method.options.get(key, (0.0,))[0] is None:  # a text option (module paths, model specs)
            opts[key] = value.strip()
            continue
        number = _number(spec, key, value)
        if key == "weight":
            weight = number
        else:
            opts[key] = number
    if "temperature" in opts and opts["temperature"] <= 0:
        raise UsageError(f"method {spec!r}: temperature must be positive")
    for key in ("heads", "order", "peers", "branches", "layers", "group", "feat_dim", "nce_k"):
        if key in opts and opts[key] != int(opts[key]):
            raise UsageError(f"method {spec!r}: {key} must be a whole number (got {opts[key]:g})")
    missing = [k for k in ("student", "teacher") if method.features and not opts.get(k)]
    if missing:
        raise UsageError(f"method {spec!r}: {method.name} needs {' and '.join(f'{k}=MODULE' for k in missing)} "
                         "(dotted module paths, e.g. student=bert.pooler,teacher=bert.pooler)")
    return Spec(method, weight, opts, spec)


def _number(spec: str, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"method {spec!r}: {key} must be a number (got {value.strip()!r})") from None
    if not math.isfinite(number) or number < 0:
        raise UsageError(f"method {spec!r}: {key} must be a finite number >= 0 (got {value.strip()!r})")
    return number


def parse_all(specs) -> list[Spec]:
    """Every spec of a recipe, each method at most once."""
    out = []
    for text in specs or ():
        spec = parse(text)
        if spec.method.name in {s.method.name for s in out}:
            raise UsageError(f"method {spec.method.name} is given twice; combine its options in one --method")
        out.append(spec)
    return out


# ----------------------------------------------------------------------------------------------
# Binding methods to a run's models
# ----------------------------------------------------------------------------------------------
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
            if m.name != "lsp":  # LSP reads every node's neighbours
                sf, tf = graph_rows(sf, tf, batch, m.kind == "relation")
            total = total + m.compute(sf, tf, batch, o, heads[k] if m.name == "minilm" else conns[k])
        return total / len(pairs)

    return loss_terms.Term(m.name, m.paper, lambda r, t: w if t else 0.0, compute, frozenset({"teacher"}),
                           modules=lambda r: (s_paths, t_paths))


# the loss terms recipes switch on with their own keys (loss_terms.TERMS), for `tdkd methods`
BUILTIN = (
    ("kd", "response", "Hinton et al., 2015 (logit KD)", "alpha, temperature", "text, ViT, CNN"),
    ("ce", "-", "cross-entropy on the labels (weight 1 - alpha)", "alpha", "text, ViT, CNN"),
    ("hidden", "feature", "TinyBERT hidden-state MSE, Jiao et al., 2020", "hidden_weight, layer_map", "text"),
    ("attention", "feature", "TinyBERT attention-map MSE, Jiao et al., 2020", "attention_weight, layer_map", "text"),
    ("tensor", "OPDF", "tensor constraint, Zhan et al., NeurIPS 2024", "tensor_lambda, layer_map", "text, ViT, CNN"),
)


def catalogue() -> list[dict]:
    """Every loss a recipe can use: the built-in terms and the methods, with options and defaults."""
    rows = [{"name": n, "kind": k, "paper": p, "recipe": keys, "families": fam, "options": {}} for n, k, p, keys, fam in BUILTIN]
    for m in METHODS.values():
        rows.append({"name": m.name, "kind": m.kind, "paper": m.paper, "families": m.families,
                     "recipe": (f"methods: ['{m.name}']" if m.kind in TRAINING_SCHEMES else
                                f"methods: ['{m.name}:weight=1{',student=MODULE,teacher=MODULE' if m.features else ''}']"),
                     "options": {k: {"default": d, "help": h} for k, (d, h) in m.options.items()}})
    return rows

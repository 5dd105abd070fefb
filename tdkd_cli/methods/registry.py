"""Distillation methods beyond logit KD, each a named loss term a recipe switches on with
``methods: ["NAME:weight=W,option=value,..."]`` (``--method`` on the command line, repeatable).

A method works with dense and over-parameterized (MPO) students alike and combines with every other
term, the tensor constraint included: it becomes one more entry of the weighted sum in
loss_terms, logged under its own name. The formulas are method_losses.py's.

Feature and relation methods read the outputs of modules named by dotted path, captured with
forward hooks: ``student=PATH,teacher=PATH``. Several pairs are joined with ``+``
(``student=a+b,teacher=c+d``; the loss is their mean), and ``*`` pairs the layers of the run's
layer map (``student=bert.encoder.layer.*,teacher=bert.encoder.layer.*`` compares student layer i
with teacher layer g(i)). binding.py binds a run's methods to its models once. Plug-ins add to
``METHODS`` (plugins.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import connectors, contrastive
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
    return ml.lsp_loss(sf[0], tf[0], batch["edge_index"], o["kernel"] or "rbf", o["kl"] or "student")


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
                kernel=(None, "similarity kernel: rbf (default: -||z_i - z_j||^2), linear or poly ((z_i.z_j + 1)^2)"),
                kl=(None, "student (default): KL(LS_student || LS_teacher), the paper's loss; teacher: "
                          "KL(LS_teacher || LS_student), as the authors' released code computes it")),
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


# text options that take one of a few words (checked when the method is parsed, not at its first step)
CHOICES = {"lsp": {"kernel": ("rbf", "linear", "poly"), "kl": ("student", "teacher")}}


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
    for key, allowed in CHOICES.get(method.name, {}).items():
        if opts[key]:
            opts[key] = opts[key].lower()
            if opts[key] not in allowed:
                raise UsageError(f"method {method.name}: {key} must be {', '.join(allowed[:-1])} or {allowed[-1]} "
                                 f"(got {opts[key]!r})")
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

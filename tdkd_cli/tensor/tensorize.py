"""Put MPO cores on a model's Linear and Conv2d weights and take them off again (merge).

A tensorized layer keeps its class: its ``weight`` becomes a torch parametrization computed from
the cores (``torch.nn.utils.parametrize``), so HF and timm model classes, their forward code and
their hooks are untouched. The cores live at ``<module>.parametrizations.weight.original<k>``;
tdkd's checkpoints store them under its own names (see checkpoint.py).

Convolutions: a Conv2d weight (out, in/groups, kh, kw) is decomposed in its matrix form
out x (in/groups * kh * kw); the input factor shape is the channel plan with the kernel window
kh*kw folded into its trailing factor, so the window stays inside one core and the channel
factors are those of a Linear of the same widths (and align with a teacher's the same way).
Stride, padding, dilation and groups are the module's own and untouched. A grouped or depthwise
convolution is one MPO over its stored weight (exact, as for any matrix); a 1x1 convolution is a
plain out x in matrix. Transposed, 1-D and 3-D convolutions are not decomposed.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import mpo
from ..core.errors import UsageError

# Default target patterns (fnmatch on dotted module names) per model family.
BERT_TARGETS = (
    "*layer.*.attention.self.query",
    "*layer.*.attention.self.key",
    "*layer.*.attention.self.value",
    "*layer.*.attention.output.dense",
    "*layer.*.intermediate.dense",
    "*layer.*.output.dense",
)
DISTILBERT_TARGETS = (
    "*layer.*.attention.q_lin",
    "*layer.*.attention.k_lin",
    "*layer.*.attention.v_lin",
    "*layer.*.attention.out_lin",
    "*layer.*.ffn.lin1",
    "*layer.*.ffn.lin2",
)
VIT_TARGETS = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")

HF_DEFAULT_TARGETS = {
    "bert": BERT_TARGETS,
    "roberta": BERT_TARGETS,
    "xlm-roberta": BERT_TARGETS,
    "electra": BERT_TARGETS,
    "camembert": BERT_TARGETS,
    "distilbert": DISTILBERT_TARGETS,
}


def default_targets(model: nn.Module, family: str) -> tuple[str, ...]:
    if family == "pyg":  # graph models: every weight matrix (PyG's Linear, nn.Linear)
        return tuple(name for name, m in model.named_modules() if isinstance(m, linear_types()))
    if family == "timm":
        if any(fnmatch.fnmatchcase(name, VIT_TARGETS[0]) for name, _ in model.named_modules()):
            return VIT_TARGETS
        names = cnn_targets(model)
        if not names:
            raise UsageError("no default target layers for this timm model; pass --targets PATTERN")
        return names
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in HF_DEFAULT_TARGETS:
        return HF_DEFAULT_TARGETS[model_type]
    raise UsageError(f"no default target layers for model type {model_type!r}; pass --targets PATTERN")


def cnn_targets(model: nn.Module) -> tuple[str, ...]:
    """Default targets of a timm model without ViT blocks (ResNet, RegNet, MobileNet, EfficientNet,
    ConvNeXt, ...): every Conv2d (depthwise and grouped included) and every Linear except the
    classifier head, in model order."""
    get_head = getattr(model, "get_classifier", None)
    head = get_head() if callable(get_head) else None
    head_ids = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    return tuple(name for name, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in head_ids)


@dataclass
class LayerPlan:
    """How one Linear or Conv2d weight is (or will be) tensorized: the MPO of its matrix form
    (out_features x in_features); ``weight_shape`` is the module's own weight shape (out, in) for a
    Linear, (out, in/groups, kh, kw) for a Conv2d."""

    name: str
    out_features: int
    in_features: int
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    rank: int | None = None
    bonds: list[int] = field(default_factory=list)
    weight_shape: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.weight_shape:
            self.weight_shape = (self.out_features, self.in_features)

    @property
    def kernel(self) -> int:
        """Elements of the kernel window (kh*kw; 1 for a Linear)."""
        return math.prod(self.weight_shape[2:])

    @property
    def n(self) -> int:
        return len(self.out_shape)

    @property
    def central(self) -> int:
        return mpo.central_index(self.n)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def mpo_params(self) -> int:
        return mpo.num_params(self.out_shape, self.in_shape, self.bonds or mpo.full_bonds(self.out_shape, self.in_shape, self.rank))


def parse_shapes(specs: Sequence[str]) -> dict[int, tuple[int, ...]]:
    """'768=32,1,1,1,24' -> {768: (32,1,1,1,24)}; repeatable."""
    out: dict[int, tuple[int, ...]] = {}
    for spec in specs:
        dim, sep, facs = spec.partition("=")
        try:
            if not sep:
                raise ValueError
            d = int(dim)
            f = tuple(int(x) for x in facs.split(","))
        except ValueError:
            raise UsageError(f"--shapes {spec!r}: expected DIM=F1,F2,... e.g. 768=32,1,1,1,24") from None
        out[d] = mpo.check_factors(d, f)
    return out


SUPPORTED = (nn.Linear, nn.Conv2d)


def linear_types() -> tuple[type, ...]:
    """nn.Linear, and PyTorch Geometric's own Linear (torch_geometric.nn.Linear: a Module of its own
    with an (out, in) weight used through F.linear) once PyG is imported; a PyG model exists only
    then, so PyG is never imported here."""
    pyg = sys.modules.get("torch_geometric.nn.dense.linear")
    return (nn.Linear, pyg.Linear) if pyg is not None else (nn.Linear,)


def supported() -> tuple[type, ...]:
    """The module kinds tdkd decomposes: ``linear_types()`` and nn.Conv2d."""
    return (*linear_types(), nn.Conv2d)


def select_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the Linear and Conv2d modules matching any pattern; every pattern must match one.
    A pattern that matches a transposed, 1-D or 3-D convolution is refused (not supported)."""
    modules = list(model.named_modules())
    layers = [name for name, m in modules if isinstance(m, supported())]
    other_convs = {name: type(m).__name__ for name, m in modules
                   if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d)}
    chosen: list[str] = []
    for pat in patterns:
        bad = [name for name in other_convs if fnmatch.fnmatchcase(name, pat)]
        if bad:
            raise UsageError(f"target pattern {pat!r} matches {bad[0]}, a {other_convs[bad[0]]}: tdkd decomposes "
                             "Linear and Conv2d layers only (transposed, 1-D and 3-D convolutions are not supported)")
        hits = [name for name in layers if fnmatch.fnmatchcase(name, pat)]
        if not hits:
            raise UsageError(f"target pattern {pat!r} matches no Linear or Conv2d layer of the model")
        chosen += [h for h in hits if h not in chosen]
    return [name for name in layers if name in chosen]  # model order


def plan_layers(
    model: nn.Module,
    names: Iterable[str],
    n: int,
    shapes: dict[int, tuple[int, ...]] | None = None,
    rank: int | None = None,
) -> list[LayerPlan]:
    """Factor shapes per layer: an explicit shape for a dimension wins, else paper-style [a,1..1,b].
    For a convolution the input side is planned on its channels (in/groups) and the kernel window
    joins the trailing factor; an explicit shape may name the channels or the whole in*kh*kw."""
    if n < 2:
        raise UsageError(f"--n must be at least 2 (got {n})")
    shapes = shapes or {}
    for dim, fac in shapes.items():
        mpo.check_factors(dim, fac)
        if len(fac) != n:
            raise UsageError(f"factor shape {list(fac)} for {dim} has {len(fac)} factors but n is {n}")
    modules = dict(model.named_modules())
    plans, used = [], set()
    for name in names:
        w_shape = tuple(modules[name].weight.shape)
        out_f, channels, kernel = w_shape[0], w_shape[1], math.prod(w_shape[2:])
        out_shape = tuple(shapes.get(out_f) or mpo.plan_factors(out_f, n))
        used.add(out_f)
        if kernel > 1 and channels * kernel in shapes:
            in_shape = tuple(shapes[channels * kernel])
            used.add(channels * kernel)
        else:
            in_shape = with_kernel(shapes.get(channels) or mpo.plan_factors(channels, n), kernel)
            used.add(channels)
        plans.append(LayerPlan(name, out_f, channels * kernel, out_shape, in_shape, rank,
                               mpo.full_bonds(out_shape, in_shape, rank), w_shape))
    unused = sorted(set(shapes) - used)
    if unused:
        dims = sorted({d for p in plans for d in (p.out_features, p.weight_shape[1], p.in_features)})
        raise UsageError(f"--shapes {unused[0]}=...: no target layer has a dimension of {unused[0]} "
                         f"(their dimensions: {', '.join(map(str, dims[:12]))}{', ...' if len(dims) > 12 else ''})")
    return plans


def with_kernel(channel_shape: Sequence[int], kernel: int) -> tuple[int, ...]:
    """Input factor shape of a convolution: the channel factors with the kernel window (kh*kw
    elements) folded into the trailing one."""
    return tuple(channel_shape[:-1]) + (channel_shape[-1] * kernel,)


class MPOWeight(nn.Module):
    """Parametrization: weight = contract(cores). ``right_inverse`` decomposes a dense weight, or,
    with ``empty=True``, only allocates cores of the planned shapes (to be filled from a checkpoint)."""

    def __init__(self, plan: LayerPlan, empty: bool = False):
        super().__init__()
        self.plan = plan
        self.empty = empty
        # When set, forward returns this tensor instead of contracting (see rebuilt_weights).
        self.override: torch.Tensor | None = None

    def forward(self, *cores: torch.Tensor) -> torch.Tensor:
        if self.override is not None:
            return self.override
        return mpo.contract(cores).reshape(self.plan.weight_shape)

    def right_inverse(self, weight: torch.Tensor):
        p = self.plan
        if self.empty:
            shapes = mpo.core_shapes(p.out_shape, p.in_shape, p.bonds)
            return tuple(torch.zeros(s, dtype=weight.dtype, device=weight.device) for s in shapes)
        cores = mpo.decompose(weight.reshape(p.out_features, p.in_features), p.out_shape, p.in_shape, p.rank)
        p.bonds = [1] + [c.shape[-1] for c in cores]
        return tuple(cores)


def tensorize(model: nn.Module, plans: Sequence[LayerPlan], empty: bool = False, progress=None) -> None:
    """Replace each planned Linear/Conv2d weight by MPO cores, in place."""
    modules = dict(model.named_modules())
    for plan in plans:
        lin = modules[plan.name]
        with torch.no_grad():
            parametrize.register_parametrization(lin, "weight", MPOWeight(plan, empty=empty), unsafe=True)
        if not isinstance(lin, SUPPORTED):
            # PyG's Linear writes ``weight`` into state_dict itself; while parametrized, store what
            # nn.Linear stores (bias and the cores; the class is this module's own, torch made it)
            type(lin)._save_to_state_dict = nn.Module._save_to_state_dict
        if progress is not None:
            progress(plan)


def mpo_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Tensorized modules by name."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], MPOWeight):
            out[name] = m
    return out


def layer_cores(module: nn.Module) -> list[nn.Parameter]:
    pw = module.parametrizations.weight
    k, cores = 0, []
    while hasattr(pw, f"original{k}"):
        cores.append(getattr(pw, f"original{k}"))
        k += 1
    return cores


def parametrized_key(checkpoint_key: str) -> str:
    """state_dict key of a tensor stored in a tdkd checkpoint: cores are stored as
    ``<layer>.mpo_core.<k>`` (checkpoint.core_key) and live at
    ``<layer>.parametrizations.weight.original<k>``; every other key is the same."""
    layer, sep, k = checkpoint_key.rpartition(".mpo_core.")
    return f"{layer}.parametrizations.weight.original{k}" if sep else checkpoint_key


def dense_param_count(model: nn.Module) -> int:
    """Parameters of the model once merged: dense weights counted in place of their cores."""
    total = sum(p.numel() for p in model.parameters())
    for mod in mpo_modules(model).values():
        total += layer_plan(mod).dense_params - sum(c.numel() for c in layer_cores(mod))
    return total


def layer_plan(module: nn.Module) -> LayerPlan:
    return module.parametrizations.weight[0].plan


def merge(model: nn.Module) -> dict[str, LayerPlan]:
    """Contract every tensorized weight (in float64) into a plain dense weight, in place."""
    merged = {}
    for name, module in mpo_modules(model).items():
        cores = layer_cores(module)
        plan = layer_plan(module)
        with torch.no_grad():
            dense = mpo.contract([c.detach().to(torch.float64) for c in cores]).to(cores[0].dtype)
            dense = dense.reshape(plan.weight_shape)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        with torch.no_grad():
            module.weight.copy_(dense)
        merged[name] = plan
    return merged


class RebuiltWeights:
    """Dense weights contracted from the cores once and reused by every forward until released.

    Under gradient accumulation each micro-batch's backward stops at a leaf copy of W (its gradient
    accumulates there); ``backward()`` then sends the summed gradient through the contraction once,
    so the cores cost one contraction forward and one backward per optimizer step, not per
    micro-batch. With ``grad=False`` (evaluation) the weights are plain tensors without a graph."""

    def __init__(self, model: nn.Module, grad: bool = True):
        self.entries: list[tuple[MPOWeight, torch.Tensor, torch.Tensor]] = []
        for module in mpo_modules(model).values():
            pw = module.parametrizations.weight[0]
            pw.override = None
            if grad:
                w = module.weight
                leaf = w.detach().requires_grad_(True)
            else:
                with torch.no_grad():
                    w = module.weight
                leaf = w
            pw.override = leaf
            self.entries.append((pw, w, leaf))
        self.grad = grad

    def backward(self) -> None:
        outs, grads = [], []
        for _, w, leaf in self.entries:
            if leaf.grad is not None:
                outs.append(w)
                grads.append(leaf.grad)
        if outs:
            torch.autograd.backward(outs, grads)

    def release(self) -> None:
        for pw, _, _ in self.entries:
            pw.override = None
        self.entries = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

"""Graph models from PyTorch Geometric (family "pyg"): the presets ``gcn``, ``sage``, ``gat`` and
``mlp`` with their sizes, built from the data's feature count and classes with a random
initialisation; the ``source`` a manifest stores to rebuild one; the forward pass over a graph; the
layer list the tensor constraint pairs by the uniform map.

A preset takes options after a colon, like a method: ``gcn:hidden=64,layers=2,dropout=0.5``
(``gat`` also ``heads=8``; its hidden width is per head). The models are PyG's own classes
(torch_geometric.nn.models.GCN, GraphSAGE, GAT, MLP), so a merged checkpoint loads with plain PyG:
``GCN(**source["kwargs"]).load_state_dict(safetensors.torch.load_file("model.safetensors"))``.
"""

from __future__ import annotations

import math
from typing import Any

from ..core.errors import CheckpointError, UsageError

GRAPH_PRESETS: dict[str, dict[str, Any]] = {
    # Kipf & Welling (GCN), Hamilton et al. (GraphSAGE), Velickovic et al. (GAT: 8 heads of 8), and a
    # plain MLP on the node features (GLNN's student); 2 layers, dropout 0.5
    "gcn": dict(model_name="GCN", hidden=64, layers=2, dropout=0.5),
    "sage": dict(model_name="GraphSAGE", hidden=64, layers=2, dropout=0.5),
    "gat": dict(model_name="GAT", hidden=8, layers=2, dropout=0.6, heads=8),
    "mlp": dict(model_name="MLP", hidden=64, layers=2, dropout=0.5),
}
MODEL_NAMES = ("GCN", "GraphSAGE", "GAT", "MLP")
_OPTIONS = {"hidden": int, "layers": int, "dropout": float, "heads": int}


def is_graph_preset(spec: str) -> bool:
    return str(spec).split(":", 1)[0].strip().lower() in GRAPH_PRESETS


def parse_preset(spec: str) -> tuple[str, dict]:
    """'gcn:hidden=64,layers=2' -> ('gcn', the preset's settings with the options applied)."""
    name, _, rest = str(spec).partition(":")
    name = name.strip().lower()
    opts = dict(GRAPH_PRESETS[name])
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _OPTIONS or (key == "heads" and name != "gat"):
            known = ", ".join(k for k in _OPTIONS if k != "heads" or name == "gat")
            raise UsageError(f"model {spec!r}: expected option=value with an option of {name} ({known}), got {item!r}")
        try:
            opts[key] = _OPTIONS[key](value)
        except ValueError:
            raise UsageError(f"model {spec!r}: {key} must be a number (got {value.strip()!r})") from None
    if opts["hidden"] < 1 or opts["layers"] < 1 or opts.get("heads", 1) < 1:
        raise UsageError(f"model {spec!r}: hidden, layers and heads must be at least 1")
    if not 0.0 <= opts["dropout"] < 1.0:
        raise UsageError(f"model {spec!r}: dropout must be in [0, 1) (got {opts['dropout']})")
    return name, opts


def preset_source(spec: str, in_channels: int, out_channels: int) -> dict:
    """The manifest ``source`` of a preset for a graph with these features and classes."""
    _, o = parse_preset(spec)
    kwargs = dict(in_channels=int(in_channels), hidden_channels=o["hidden"], out_channels=int(out_channels),
                  num_layers=o["layers"], dropout=o["dropout"])
    if o["model_name"] == "MLP":
        kwargs["norm"] = None  # GLNN's MLP: no batch norm
    if o["model_name"] == "GAT":
        kwargs["heads"] = o["heads"]
    return {"family": "pyg", "spec": str(spec), "model_name": o["model_name"], "kwargs": kwargs}


def build(source: dict, where: str = "manifest"):
    """A freshly initialised PyG model of ``source`` (fields checked; CheckpointError naming ``where``)."""
    from torch_geometric.nn import models as pyg_models

    name, kwargs = source.get("model_name"), source.get("kwargs")
    if name not in MODEL_NAMES:
        raise CheckpointError(f"{where}: source.model_name {name!r} is not one of tdkd's graph models ({', '.join(MODEL_NAMES)})")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: source.kwargs must be an object")
    for key in ("in_channels", "hidden_channels", "out_channels", "num_layers", "heads"):
        v = kwargs.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"{where}: source.kwargs.{key} must be a positive integer (got {v!r})")
    try:
        return getattr(pyg_models, name)(**kwargs).eval()
    except Exception as exc:  # PyG raises several types for bad keyword arguments
        raise CheckpointError(f"{where}: source.kwargs do not build a PyG {name}: {str(exc).splitlines()[0]}") from None


def forward(model, x, edge_index):
    """Node logits (N x C): message passing over ``edge_index``, or the MLP on the features alone."""
    from torch_geometric.nn.models import MLP

    return model(x) if isinstance(model, MLP) else model(x, edge_index)


def input_dropout(model) -> float:
    """Dropout on the node features while training (Kipf & Welling drop the input too; PyG's models
    drop only between layers): the model's own rate."""
    d = getattr(model, "dropout", 0.0)
    if isinstance(d, (list, tuple)):
        return float(d[0]) if d else 0.0
    return float(getattr(d, "p", d) or 0.0)


def feature_dropout(x, p: float, nonzero=None):
    """Dropout on node features; with ``nonzero`` (the (rows, cols) of x's nonzero entries) only
    those are drawn, which is the same in distribution for sparse bag-of-words features and
    cheaper by their sparsity (Kipf & Welling's sparse dropout)."""
    import torch

    if p <= 0:
        return x
    if nonzero is None:
        return torch.nn.functional.dropout(x, p)
    rows, cols = nonzero
    keep = torch.rand(rows.shape[0], device=x.device) >= p
    out = torch.zeros_like(x)
    out[rows[keep], cols[keep]] = x[rows[keep], cols[keep]] / (1 - p)
    return out


def layer_list(model) -> tuple[str, list]:
    """(path, layers) of a PyG model: ``convs`` of a GNN, ``lins`` of an MLP."""
    for path in ("convs", "lins"):
        layers = getattr(model, path, None)
        if layers is not None and len(layers) > 0:
            return path, list(layers)
    raise UsageError(f"{type(model).__name__} has no layer list (convs or lins)")


def layer_weights(model) -> list[str]:
    """The main weight matrix of each layer, in order: an MLP's ``lins.i``, GCN/GAT ``convs.i.lin``,
    GraphSAGE ``convs.i.lin_l`` (the neighbour transform)."""
    path, layers = layer_list(model)
    if path == "lins":
        return [f"lins.{i}" for i in range(len(layers))]
    return [f"convs.{i}.{'lin' if hasattr(layer, 'lin') else 'lin_l'}" for i, layer in enumerate(layers)]


def is_graph_model(model) -> bool:
    return type(model).__module__.startswith("torch_geometric.")


def partner_fn(student, teacher):
    """name -> teacher module for the tensor constraint: the main weight of student layer i pairs
    with that of teacher layer ceil((i+1) L_T / L_S) - 1 (the uniform map over the layer lists)."""
    s_w, t_w = layer_weights(student), layer_weights(teacher)
    pairs = {s: t_w[math.ceil((i + 1) * len(t_w) / len(s_w)) - 1] for i, s in enumerate(s_w)}
    return lambda name: pairs.get(name)


def load_preset(spec: str, in_channels: int | None, out_channels: int | None, seed: int):
    """(model, source) of a preset, randomly initialised with ``seed`` (graph presets carry no
    pretrained weights)."""
    import torch

    if in_channels is None or out_channels is None:
        raise UsageError(f"graph model {spec!r} is built for a graph's features and classes: use it with --data GRAPH "
                         "(tdkd distill / eval / bench), e.g. --data builtin:cora")
    source = preset_source(spec, in_channels, out_channels)
    torch.manual_seed(seed)
    return build(source, "preset"), source


def probe_inputs(model, nodes: int = 8, seed: int = 0, device: str = "cpu", dtype=None) -> dict:
    """A seeded random graph for the model: ``x`` (nodes x in_channels) and a ring of edges."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand((nodes, in_channels(model)), generator=g)
    ring = torch.arange(nodes)
    edge_index = torch.stack([torch.cat([ring, (ring + 1) % nodes]), torch.cat([(ring + 1) % nodes, ring])])
    return {"x": x.to(device=device, dtype=dtype), "edge_index": edge_index.to(device)}


def in_channels(model) -> int:
    if hasattr(model, "in_channels"):
        return int(model.in_channels)
    raise UsageError(f"{type(model).__name__} does not say its input width")


def save_dense(model, source: dict, out_dir) -> None:
    """A plain PyG checkpoint: model.safetensors (the state_dict) + config.json naming the class and
    its keyword arguments (``format: tdkd-pyg``)."""
    import json
    from pathlib import Path

    from . import checkpoint as ckpt

    ckpt.save_tensors(dict(model.state_dict()), Path(out_dir) / ckpt.TENSORS, metadata={"format": "pt"})
    cfg = {"format": DENSE_FORMAT, "model_name": source["model_name"], "kwargs": source["kwargs"], "spec": source.get("spec")}
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_dense(path, spec: str):
    """(model, source) of a directory ``save_dense`` wrote (weights loaded strictly)."""
    import json
    from pathlib import Path

    from . import checkpoint as ckpt

    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
        source = {"family": "pyg", "spec": spec, "model_name": cfg["model_name"], "kwargs": dict(cfg["kwargs"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}/config.json is not a tdkd PyG model config") from None
    model = build(source, f"{path}/config.json")
    try:
        model.load_state_dict(ckpt.load_tensors(path / ckpt.TENSORS), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the PyG {source['model_name']}: {str(exc).splitlines()[0]}") from None
    return model.eval(), source


DENSE_FORMAT = "tdkd-pyg"

"""`tdkd eval` and `tdkd bench` on graph data: node-classification accuracy of a graph model on
the test (and validation) nodes, and the inputs that time a GNN against an MLP on the same nodes.

Evaluation runs on the whole graph (an inductively trained model meets the test nodes' edges
here for the first time). For timing, a GNN gets the subgraph its layers read around the test
nodes (their k-hop neighbourhood, k = its number of message-passing layers: everything message
passing needs for their logits) and an MLP the test nodes' features alone.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UsageError
from ..engine import evaluate
from ..io import graph_models, graphs
from ..io.model_files import load_any


def load_graph_model(spec: str, graph, seed: int = 0):
    """A model for ``graph``: a graph preset built for it, or a checkpoint whose widths fit it."""
    from ..io.pair import check_data_fits

    loaded = load_any(spec, num_labels=graph.num_classes, seed=seed, graph_features=int(graph.x.shape[1]))
    check_data_fits(loaded, spec, int(graph.x.shape[1]))
    return loaded


def evaluate_graph_model(spec: str, data: str, *, device: str = "cpu", seed: int = 0,
                         predictions: Path | None = None) -> dict:
    """Accuracy on the test nodes ("accuracy") and on the validation nodes ("val_accuracy")."""
    graph = graphs.load(data)
    loaded = load_graph_model(spec, graph, seed)
    metrics, scores, preds = evaluate.evaluate_graph(loaded.model, graph, "test", device)
    if len(graph.splits["val"]):
        metrics["val_accuracy"] = evaluate.evaluate_graph(loaded.model, graph, "val", device)[0]["accuracy"]
    if predictions is not None:
        _write_predictions(Path(predictions), graph, scores, preds)
    return {"model": spec, "data": str(graph.path), "task": "node classification", "split": "test",
            "examples": len(graph.splits["test"]), "metrics": metrics,
            "predictions": str(predictions) if predictions else None}


def _write_predictions(path: Path, graph, scores, preds) -> None:
    import json

    from ..io import checkpoint as ckpt

    lines = [json.dumps({"node": int(n), "label": int(graph.y[n]), "prediction": int(p),
                         "scores": [round(float(s), 6) for s in scores[i].tolist()]})
             for i, (n, p) in enumerate(zip(graph.splits["test"].tolist(), preds))]
    ckpt.atomic_write_text(path, "\n".join(lines) + "\n")


def bench_inputs(model, graph, device: str, dtype) -> dict:
    """What the model reads for the test nodes' logits: their features (MLP), or their k-hop
    subgraph (a GNN of k layers), with the positions of the test nodes in it."""
    import torch
    from torch_geometric.utils import k_hop_subgraph

    test = graph.splits["test"]
    path, layers = graph_models.layer_list(model)
    if path == "lins":
        return {"x": graph.x[test].to(device=device, dtype=dtype), "edge_index": torch.empty(2, 0, dtype=torch.long),
                "nodes": torch.arange(len(test), device=device), "desc": f"{len(test)} test nodes' features"}
    subset, edges, mapping, _ = k_hop_subgraph(test, len(layers), graph.edge_index, relabel_nodes=True,
                                               num_nodes=graph.num_nodes)
    return {"x": graph.x[subset].to(device=device, dtype=dtype), "edge_index": edges.to(device), "nodes": mapping.to(device),
            "desc": f"{len(test)} test nodes, {len(layers)}-hop subgraph ({len(subset)} nodes, {edges.shape[1]} edges)"}


def check_graph_bench(data: str | None) -> None:
    if data is not None and not graphs.is_graph_data(data):
        raise UsageError(f"--data {data}: tdkd bench times graph models on a graph (builtin:cora, builtin:citeseer, "
                         "a .npz file or a directory with nodes + edges tables, .csv or .parquet)")

"""Full-graph training on a node-classification graph (io/graphs.py): every step is one epoch, a
forward pass over the whole graph.

transductive  the model sees the whole graph; cross-entropy on the training nodes' labels, the
              KD terms on every node (GLNN: the teacher's soft labels of unlabeled nodes teach).
inductive     the test nodes' edges are hidden while training and validating (the test nodes stand
              alone and are left out of every loss); `tdkd eval` then runs on the whole graph.

A batch is ``x`` (all nodes), ``edge_index`` (the graph the setting allows), ``nodes`` (whose
outputs the loss reads, in order) and ``labels`` (theirs: the class of a training node, -100,
which cross-entropy ignores, for every other), and ``x_nonzero`` (where x is nonzero: the input
dropout draws only those).
"""

from __future__ import annotations

from ..core.errors import UsageError
from ..methods import registry


def check_run(r, world: int) -> None:
    """What full-graph training cannot do, refused with one line before anything is written."""
    if world > 1:
        raise UsageError("graph data trains full-graph in one process; run it without torchrun")
    if r.grad_accum != 1:
        raise UsageError(f"graph data trains full-graph, one step per epoch: grad_accum must be 1 (got {r.grad_accum})")
    specs = registry.parse_all(r.methods)
    schemes = [s.method.name for s in specs if s.method.kind in registry.TRAINING_SCHEMES]
    if schemes:
        raise UsageError(f"method {schemes[0]} is not supported on graph data (it trains peers, branches or layer "
                         "replacements); use KD, the feature, relation and graph methods")
    contrastive = [s.method.name for s in specs if s.method.kind == "contrastive"]
    if contrastive:
        raise UsageError(f"method {contrastive[0]} is not supported on graph data (its memory bank keeps a row per "
                         "training example, and a graph trains on every node at once); use KD, the feature, relation "
                         "and graph methods")
    if r.hidden_weight > 0 or r.attention_weight > 0:
        raise UsageError("hidden_weight and attention_weight read Hugging Face hidden states; on graph models use "
                         "fitnet (student=convs.0,teacher=convs.0) or lsp")


def training_edges(graph, setting: str):
    return graph.edges_without("test") if setting == "inductive" else graph.edge_index


def loss_nodes(graph, setting: str) -> list[int]:
    """Nodes whose outputs enter the loss: all, or all but the test nodes (inductive)."""
    import torch

    keep = torch.ones(graph.num_nodes, dtype=torch.bool)
    if setting == "inductive":
        keep[graph.splits["test"]] = False
    return keep.nonzero().flatten().tolist()


def batch(graph, nodes: list[int], setting: str, device: str) -> dict:
    import torch

    idx = torch.tensor(nodes, dtype=torch.long)
    is_train = torch.zeros(graph.num_nodes, dtype=torch.bool)
    is_train[graph.splits["train"]] = True
    labels = torch.where(is_train[idx], graph.y[idx], torch.full_like(idx, -100))
    nonzero = tuple(t.to(device) for t in graph.nonzero())
    return {"x": graph.x.to(device), "edge_index": training_edges(graph, setting).to(device),
            "nodes": idx.to(device), "labels": labels.to(device), "x_nonzero": nonzero}

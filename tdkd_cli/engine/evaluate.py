"""Task metrics (scikit-learn / scipy) and batched inference for `tdkd eval`."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

from ..core.errors import UsageError


def compute_metrics(names: Sequence[str], preds, labels, scores=None) -> dict[str, float]:
    """accuracy, f1 (binary, positive class 1), matthews, pearson, spearman, top1, top5.
    ``scores`` (N x C) is needed for top-k."""
    import numpy as np
    from scipy import stats
    from sklearn import metrics as skm

    y_true = np.asarray(labels)
    y_pred = np.asarray(preds)
    if len(y_true) == 0:
        raise UsageError("no examples to score")
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(skm.accuracy_score(y_true, y_pred))
        elif name == "f1":
            out[name] = float(skm.f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0.0))
        elif name == "matthews":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = float(skm.matthews_corrcoef(y_true, y_pred))
        elif name in ("pearson", "spearman"):
            if np.std(y_true) == 0 or np.std(y_pred) == 0:
                out[name] = float("nan")  # undefined for constant inputs
            else:
                fn = stats.pearsonr if name == "pearson" else stats.spearmanr
                out[name] = float(fn(y_pred, y_true)[0])
        elif name in ("top1", "top5"):
            k = 1 if name == "top1" else 5
            s = np.asarray(scores)
            k = min(k, s.shape[1])
            with warnings.catch_warnings():  # k >= classes is legitimately 1.0
                warnings.simplefilter("ignore")
                out[name] = float(skm.top_k_accuracy_score(y_true, s, k=k, labels=np.arange(s.shape[1])))
        else:
            raise UsageError(f"unknown metric {name!r}")
    return out


def predictions(scores, regression: bool) -> list:
    """Predicted labels from scores (N x C): the argmax, or the first output for regression."""
    return scores[:, 0].tolist() if regression else scores.argmax(-1).tolist()


def predict_encoded(model, enc, batch_size: int, device: str = "cpu", on_batch: Callable[[int], None] | None = None):
    """Logits (N x C, float32, CPU) for every tokenized example (data.Encoded), in input order.
    Batches are grouped by length (less padding); MPO weights are contracted once for all of them."""
    import torch

    from ..io import data as data_mod
    from ..tensor import tensorize

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
    out = [None] * len(order)
    was_training = model.training
    model.eval().to(device)
    with torch.no_grad(), tensorize.RebuiltWeights(model, grad=False):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            b = data_mod.collate(enc, idx, device)
            # token_type_ids matter for sentence pairs (RTE, MRPC, ...): collate passes them when the tokenizer made them
            inputs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
            logits = model(**inputs).logits.float().cpu()
            for j, i in enumerate(idx):
                out[i] = logits[j]
            if on_batch:
                on_batch(len(idx))
    model.train(was_training)
    return torch.stack(out)


def predict_images(model, files, batch_size: int, device: str = "cpu", on_batch=None):
    """Logits (N x C, float32, CPU) for image files, resized and normalised as the model expects."""
    import torch

    from ..tensor import tensorize
    from ..io.data import image_tensor
    from ..io.models import image_norm

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    size, mean, std = image_norm(model)
    outs = []
    was_training = model.training
    model.eval().to(device)
    with torch.no_grad(), tensorize.RebuiltWeights(model, grad=False):
        for start in range(0, len(files), batch_size):
            x = image_tensor(files[start:start + batch_size], size, mean, std).to(device)
            outs.append(model(x).float().cpu())
            if on_batch:
                on_batch(x.shape[0])
    model.train(was_training)
    return torch.cat(outs)


def evaluate_text(model, enc, task, batch_size: int, device: str, on_batch=None) -> tuple[dict, object, list]:
    """(metrics of the task, scores, predictions) on tokenized examples with labels."""
    scores = predict_encoded(model, enc, batch_size, device, on_batch)
    preds = predictions(scores, task.labels is None)
    return compute_metrics(task.metrics, preds, list(enc.labels)), scores, preds


def evaluate_graph(model, graph, split: str, device: str, edge_index=None) -> tuple[dict, object, list]:
    """(accuracy, scores, predictions) on the nodes of ``split`` ("val" or "test"): one forward pass
    over ``edge_index`` (default: the whole graph)."""
    import torch

    from ..io import graph_models
    from ..tensor import tensorize

    nodes = graph.splits[split]
    if len(nodes) == 0:
        raise UsageError(f"{graph.path}: the {split} split is empty")
    was_training = model.training
    model.eval().to(device)
    edges = graph.edge_index if edge_index is None else edge_index
    with torch.no_grad(), tensorize.RebuiltWeights(model, grad=False):
        scores = graph_models.forward(model, graph.x.to(device), edges.to(device))[nodes.to(device)].float().cpu()
    model.train(was_training)
    if scores.shape[1] != graph.num_classes:
        raise UsageError(f"model has {scores.shape[1]} outputs but the graph has {graph.num_classes} classes")
    preds = predictions(scores, False)
    return compute_metrics(["accuracy"], preds, graph.y[nodes].tolist()), scores, preds


def evaluate_images(model, images, batch_size: int, device: str, on_batch=None) -> tuple[dict, object, list]:
    """(top-1/top-5, scores, predictions) on an image folder split (data.ImageData)."""
    scores = predict_images(model, images.files, batch_size, device, on_batch)
    if scores.shape[1] < len(images.classes):
        raise UsageError(f"model has {scores.shape[1]} outputs but the data has {len(images.classes)} classes")
    preds = predictions(scores, False)
    return compute_metrics(["top1", "top5"], preds, images.labels, scores.numpy()), scores, preds

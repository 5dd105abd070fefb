"""Task metrics (scikit-learn / scipy) and batched inference for `tdkd eval`."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

from .errors import UsageError


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


def predict_text(model, tokenizer, texts: Sequence[tuple[str, ...]], batch_size: int, max_length: int,
                 device: str = "cpu", on_batch: Callable[[int], None] | None = None):
    """Logits for every example, in input order. Batches are grouped by length (less padding)."""
    import torch

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    enc = [dict(tokenizer(*t, truncation=True, max_length=max_length)) for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
    out = [None] * len(enc)
    model.eval().to(device)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad([enc[i] for i in idx], return_tensors="pt")
            # token_type_ids matter for sentence pairs (RTE, MRPC, ...): pass them when the tokenizer makes them
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            logits = model(**inputs).logits
            for j, i in enumerate(idx):
                out[i] = logits[j].float().cpu()
            if on_batch:
                on_batch(len(idx))
    return torch.stack(out)


def predict_images(model, files, batch_size: int, device: str = "cpu", on_batch=None):
    import torch

    from .data import image_tensor

    from .models import image_input_size

    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = image_input_size(model)[1:]
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    outs = []
    model.eval().to(device)
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            x = image_tensor(files[start:start + batch_size], size, mean, std).to(device)
            outs.append(model(x).float().cpu())
            if on_batch:
                on_batch(x.shape[0])
    return torch.cat(outs)


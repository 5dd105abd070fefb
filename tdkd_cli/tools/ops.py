"""The decompose and merge operations as library calls: load, transform, verify, write.

Each returns a plain dict report that the CLI renders as a table or JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from ..io import checkpoint as ckpt
from ..io import graphs
from ..io import layers as layers_mod
from ..io import models
from ..tensor import mpo, tensorize
from ..engine.distributed import resolve_device
from ..core.errors import UsageError, VerificationError
from ..io.model_files import dtype_name, load_any, load_mpo_model, write_model_files
from . import graph_ops


def model_param_count(model) -> int:
    """Parameters of a (possibly tensorized) model: cores counted, not the dense weights they make."""
    return sum(p.numel() for p in model.parameters())


def decompose_model(
    spec: str,
    out: Path,
    *,
    n: int = 5,
    targets: Sequence[str] | None = None,
    shapes: Sequence[str] = (),
    rank: int | None = None,
    weights: str | None = None,
    init: str = "pretrained",
    num_labels: int | None = None,
    seed: int = 0,
    force: bool = False,
    trust_remote_code: bool = False,
    layers: str | None = None,
    on_layer: Callable | None = None,
    on_plan: Callable | None = None,
) -> dict:
    out = Path(out)
    ckpt.check_output(out, force)
    if n < 2:
        raise UsageError(f"--n must be at least 2 (got {n})")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1 (got {rank})")
    shape_map = tensorize.parse_shapes(shapes)
    loaded = models.load_model(spec, weights=weights, init=init, num_labels=num_labels,
                               trust_remote_code=trust_remote_code, seed=seed)
    if layers:
        loaded = layers_mod.cut_layers(loaded, layers)
    model = loaded.model
    patterns = list(targets) if targets else list(tensorize.default_targets(model, loaded.family))
    names = tensorize.select_targets(model, patterns)
    plans = tensorize.plan_layers(model, names, n, shape_map, rank)
    modules = dict(model.named_modules())
    originals = {p.name: modules[p.name].weight.detach().clone() for p in plans}
    dense_total = model_param_count(model)
    probe = models.probe_inputs(model, loaded.family)
    ref_out = models.forward_output(model, loaded.family, probe)
    if on_plan:
        on_plan(len(plans))
    tensorize.tensorize(model, plans, progress=on_layer)
    mpo_total = model_param_count(model)

    layers = []
    for p in plans:
        cores = tensorize.layer_cores(modules[p.name])
        err = mpo.relative_error(mpo.contract([c.detach().double() for c in cores]),
                                 originals[p.name].reshape(p.out_features, p.in_features))
        layers.append({
            "name": p.name, "out_features": p.out_features, "in_features": p.in_features,
            "weight_shape": list(p.weight_shape),
            "out_shape": list(p.out_shape), "in_shape": list(p.in_shape), "bonds": p.bonds,
            "central": p.central, "dtype": dtype_name(cores[0]),
            "dense_params": p.dense_params, "mpo_params": p.mpo_params, "rel_error": err,
        })
    mpo_out = models.forward_output(model, loaded.family, probe)
    logit_diff = float((mpo_out.double() - ref_out.double()).abs().max())

    with ckpt.atomic_dir(out, force=force, what="decomposed model") as tmp:
        tokenizer = write_model_files(tmp, model, loaded.source, loaded.tokenizer_dir, n=n, rank=rank)
    return {
        "model": spec, "output": str(out), "family": loaded.family, "n": n, "rank": rank,
        "layers": layers, "tokenizer_files": tokenizer,
        "totals": {
            "layers": len(layers),
            "dense_params_targets": sum(L["dense_params"] for L in layers),
            "mpo_params_targets": sum(L["mpo_params"] for L in layers),
            "model_params_before": dense_total, "model_params_after": mpo_total,
            "overparam_ratio": mpo_total / dense_total,
            "max_rel_error": max((L["rel_error"] for L in layers), default=0.0),
            "output_max_abs_diff": logit_diff,
        },
    }


def merge_model(model, family: str, probe: dict, tolerance: float = 1e-4) -> dict:
    """Contract every MPO layer of ``model`` back into a dense weight, in place (float64
    contraction, tensorize.merge), and check the dense model's outputs on ``probe`` against the MPO
    form's: above ``tolerance`` (relative to the largest output) a VerificationError. Returns the
    MPO-form outputs, the merged layers and the differences."""
    mpo_out = models.forward_output(model, family, probe)
    merged = tensorize.merge(model)
    diff = _compare(models.forward_output(model, family, probe), mpo_out, tolerance, "merged model")
    return {"mpo_out": mpo_out, "layers": merged, **diff}


def _compare(new_out, ref_out, tolerance: float, what: str) -> dict:
    if tuple(new_out.shape) != tuple(ref_out.shape):
        raise VerificationError(f"{what} output shape {tuple(new_out.shape)} != MPO model's {tuple(ref_out.shape)}")
    max_abs = float((new_out.double() - ref_out.double()).abs().max())
    scale = float(ref_out.double().abs().max())
    rel = max_abs / scale if scale > 0 else max_abs
    if not rel <= tolerance:
        raise VerificationError(f"{what} differs from the MPO model: max abs diff {max_abs:.3e}, relative {rel:.3e} "
                                f"> tolerance {tolerance:g}; nothing written")
    return {"max_abs_diff": max_abs, "max_rel_diff": rel}


def merge_checkpoint(src: Path, out: Path, *, tolerance: float = 1e-4, force: bool = False) -> dict:
    """Contract all cores (``merge_model``), write a plain checkpoint, reload it with plain HF/timm
    code and compare its outputs with the MPO model's on a probe batch."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise UsageError(f"{src} not found")
    ckpt.check_output(out, force)
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise UsageError(f"--tolerance must be a positive number (got {tolerance})")
    kind = ckpt.detect_kind(src)
    if kind != "mpo":
        raise UsageError(f"{src} is a dense {kind} model, not an MPO checkpoint: there is nothing to merge")
    loaded, manifest = load_mpo_model(src)
    model, family = loaded.model, loaded.family
    probe = models.probe_inputs(model, family)
    mpo_params = model_param_count(model)
    merged = merge_model(model, family, probe, tolerance)
    dense_params = model_param_count(model)
    with ckpt.atomic_dir(out, force=force, what="merged model") as tmp:
        models.save_dense(model, family, loaded.source, tmp, loaded.tokenizer_dir)
        reloaded = models.load_dense_dir(tmp)
        diff = _compare(models.forward_output(reloaded.model, family, probe), merged["mpo_out"], tolerance,
                        "merged model")
    return {
        "input": str(src), "output": str(out), "family": family, "layers": len(merged["layers"]),
        "params_mpo": mpo_params, "params_merged": dense_params,
        "max_abs_diff": diff["max_abs_diff"], "max_rel_diff": diff["max_rel_diff"], "tolerance": tolerance, "ok": True,
    }


# ----------------------------------------------------------------------------------------------
# eval and bench
# ----------------------------------------------------------------------------------------------
def evaluate_model(
    spec: str, data: Path, *, task: str | None = None, split: str = "dev", text_columns: Sequence[str] | None = None,
    label_column: str | None = None, tokenizer: str | None = None, batch_size: int = 64, max_length: int = 128,
    device: str = "cpu", limit: int | None = None, predictions: Path | None = None, init: str = "pretrained",
    seed: int = 0, on_total: Callable | None = None, on_batch: Callable | None = None,
) -> dict:
    """Task metrics of a model on a split; the same evaluation `tdkd distill` runs on its dev set."""
    from ..io import data as data_mod
    from ..engine import evaluate

    device = resolve_device(device)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    if predictions is not None:
        ckpt.check_output(Path(predictions), force=True)
    if graphs.is_graph_data(str(data)):  # node classification: test (and validation) nodes
        return graph_ops.evaluate_graph_model(spec, str(data), device=device, seed=seed, predictions=predictions)
    data, builtin_task = data_mod.resolve_data(str(data))
    task = task or builtin_task
    loaded = load_any(spec, init=init, seed=seed)
    if loaded.family == "timm":
        images = data_mod.load_images(Path(data), split)
        if limit:
            images.files, images.labels = images.files[:limit], images.labels[:limit]
        if on_total:
            on_total(len(images))
        metrics, scores, preds = evaluate.evaluate_images(loaded.model, images, batch_size, device, on_batch)
        labels, ex_labels = images.labels, images.classes
        task_name, n_examples, path = "images", len(images), images.path
    else:
        t = data_mod.get_task(task) if task else None
        text = data_mod.load_text(Path(data), t, split, text_columns, label_column, limit)
        n_model = int(getattr(loaded.model.config, "num_labels", 0))
        if n_model != text.task.num_labels:
            raise UsageError(f"model has {n_model} output labels but task {text.task.name} has {text.task.num_labels}")
        tok_dir = tokenizer or loaded.tokenizer_dir
        if tok_dir is None:
            raise UsageError(f"{spec} has no tokenizer files; pass --tokenizer DIR")
        enc = data_mod.encode(text, models.load_tokenizer(tok_dir), max_length, Path(tok_dir))
        if on_total:
            on_total(len(text))
        metrics, scores, preds = evaluate.evaluate_text(loaded.model, enc, text.task, batch_size, device, on_batch)
        labels, ex_labels = text.labels, text.label_names
        task_name, n_examples, path = text.task.name, len(text), text.path
    if predictions is not None:
        _write_predictions(Path(predictions), labels, preds, scores, ex_labels)
    return {"model": spec, "data": str(path), "task": task_name, "split": split, "examples": n_examples,
            "metrics": metrics, "predictions": str(predictions) if predictions else None}


def _write_predictions(path: Path, labels, preds, scores, label_names) -> None:
    import json

    lines = []
    for i, (y, p) in enumerate(zip(labels, preds)):
        rec = {"index": i, "label": y, "prediction": p, "scores": [round(float(s), 6) for s in scores[i].tolist()]}
        if label_names is not None and isinstance(p, int):
            rec["label_name"], rec["prediction_name"] = label_names[y], label_names[p]
        lines.append(json.dumps(rec))
    ckpt.atomic_write_text(path, "\n".join(lines) + "\n")


def bench_models(specs: Sequence[str], *, device: str = "cpu", batch_size: int = 8, seq_len: int = 128,
                 dtype: str = "float32", threads: int | None = None, warmup: int = 5, iters: int = 30,
                 init: str = "pretrained", seed: int = 0, on_round: Callable | None = None, data: str | None = None) -> dict:
    """``data``: a graph, on which graph models are timed (graph_ops.bench_inputs)."""
    from . import bench

    if not specs:
        raise UsageError("give at least one MODEL to benchmark")
    graph_ops.check_graph_bench(data)
    graph = graphs.load(data) if data is not None else None
    device = resolve_device(device)
    if dtype not in bench.DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(bench.DTYPES)} (got {dtype!r})")
    loaded = []
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec] = seen.get(spec, 0) + 1
        name = spec if seen[spec] == 1 else f"{spec}#{seen[spec]}"
        if spec.lower().endswith(".onnx") and Path(spec).is_file():  # timed with onnxruntime
            loaded.append((name, Path(spec), "onnx"))
            continue
        m = load_any(spec, init=init, seed=seed) if graph is None else graph_ops.load_graph_model(spec, graph, seed)
        loaded.append((name, m.model, m.family))
    return bench.run(loaded, device=device, batch_size=batch_size, seq_len=seq_len, dtype=dtype, threads=threads,
                     warmup=warmup, iters=iters, on_round=on_round, graph=graph)

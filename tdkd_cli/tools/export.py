"""`tdkd export MODEL --format onnx -o model.onnx`: a merged (or MPO, contracted first) HF text
classifier or timm model as an ONNX file, verified with onnxruntime.

Inputs: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for models that take them) with
dynamic batch and sequence axes, or ``x`` (images, dynamic batch); output: ``logits``. The model is
traced in eval mode (torch's TorchScript-based exporter, opset 17) on a batch of 2 x 16 tokens (or
2 images), then run by onnxruntime on a probe of another shape (3 x 11 tokens with a padded row, or
3 images) and compared with PyTorch: above ``tolerance`` (largest |difference| relative to the
largest |logit|) it exits 1 and writes nothing. The file appears under its name only when verified.

Also the ONNX side of `tdkd bench`: ``prepare_bench`` makes an onnxruntime session and its inputs.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..io import checkpoint as ckpt
from ..io import models
from ..tensor import tensorize
from ..core.errors import UsageError, VerificationError

OPSET = 17
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Logits(nn.Module):
    """The model's logits as a function of positional tensors (what the exporter traces)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        if self.names == ("x",):
            return self.model(tensors[0])
        return self.model(**dict(zip(self.names, tensors))).logits


def input_names(model: nn.Module, family: str) -> tuple[str, ...]:
    if family == "pyg":  # an MLP graph student: node features in, logits out (no graph needed)
        from ..io import graph_models

        if graph_models.layer_list(model)[0] != "lins":
            raise UsageError(f"tdkd export takes an MLP graph model; {type(model).__name__} passes messages over a "
                             "graph, which is not exported (distill it into an MLP: recipe graph-glnn)")
        return ("x",)
    if family == "timm":
        return ("x",)
    params = inspect.signature(model.forward).parameters
    return tuple(n for n in TEXT_INPUTS if n in params)


def sample_inputs(model: nn.Module, family: str, names: tuple[str, ...], batch: int, seq: int, seed: int,
                  pad_row: bool = False) -> dict[str, torch.Tensor]:
    """Seeded inputs; with ``pad_row`` the last example's second half is padding."""
    inputs = models.probe_inputs(model, family, batch=batch, seq_len=seq, seed=seed)
    if family in ("timm", "pyg"):
        return {"x": inputs["x"]}
    if pad_row:
        inputs["attention_mask"][-1, seq // 2:] = 0
    if "token_type_ids" in names:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return {n: inputs[n] for n in names}


def export_onnx(spec: str, out: Path, *, tolerance: float = 1e-4, force: bool = False, init: str = "pretrained",
                seed: int = 0) -> dict:
    from ..io.model_files import load_any

    out = Path(out)
    ckpt.check_output(out, force)
    if not (tolerance > 0):
        raise UsageError(f"--tolerance must be positive (got {tolerance})")
    loaded = load_any(spec, init=init, seed=seed)
    model = loaded.model.eval()
    merged = bool(tensorize.mpo_modules(model))
    if merged:
        tensorize.merge(model)
    names = input_names(model, loaded.family)
    wrapper = _Logits(model, names).eval()
    example = sample_inputs(model, loaded.family, names, 2, 16, seed)
    dynamic = {n: ({0: "batch"} if n == "x" else {0: "batch", 1: "sequence"}) for n in names}
    dynamic["logits"] = {0: "batch"}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with ckpt.writing("ONNX file", out), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(example.values()), str(tmp), input_names=list(names), output_names=["logits"],
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        diff = _verify(tmp, wrapper, model, loaded.family, names, seed)
        if diff > tolerance:
            raise VerificationError(f"ONNX export of {spec} does not match PyTorch: max |diff| / max |logit| = {diff:.2e} "
                                    f"(tolerance {tolerance:g}); nothing written")
        with ckpt.writing("ONNX file", out):
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"model": spec, "output": str(out), "format": "onnx", "opset": OPSET, "inputs": list(names),
            "merged_from_mpo": merged, "max_rel_diff": diff, "tolerance": tolerance, "bytes": out.stat().st_size}


def _verify(path: Path, wrapper: nn.Module, model: nn.Module, family: str, names: tuple[str, ...], seed: int) -> float:
    """Largest |onnxruntime - PyTorch| relative to the largest |logit|, on a probe of another shape."""
    probe = sample_inputs(model, family, names, 3, 11, seed + 1, pad_row=True)
    session = session_for(path)
    got = torch.from_numpy(session.run(["logits"], {n: t.numpy() for n, t in probe.items()})[0])
    with torch.no_grad():
        ref = wrapper(*probe.values()).float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def session_for(path: Path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("ONNX needs the onnxruntime package: pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise UsageError(f"cannot load {path} with onnxruntime: {str(exc).splitlines()[0][:200]}") from None


def prepare_bench(path: Path, batch: int, seq_len: int, threads: int | None) -> dict:
    """What `tdkd bench` times for an ONNX file: the session, inputs of the asked shape (images at
    the file's own height and width), parameter count and file size."""
    import numpy as np
    import onnx

    session = session_for(path, threads)
    feeds = {}
    g = np.random.default_rng(0)
    for inp in session.get_inputs():
        if inp.name == "x":
            shape = [batch] + [int(d) for d in inp.shape[1:]]
            feeds["x"] = g.standard_normal(shape, dtype=np.float32)
        elif inp.name == "input_ids":
            feeds[inp.name] = g.integers(1, 1000, (batch, seq_len), dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, seq_len), dtype=np.int64)
        else:
            feeds[inp.name] = np.zeros((batch, seq_len), dtype=np.int64)
    graph = onnx.load(str(path), load_external_data=False).graph
    params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return {"model": session, "inputs": feeds, "fn": lambda s, i: s.run(None, i), "family": "onnx",
            "input": "x".join(map(str, feeds["x"].shape[1:])) if "x" in feeds else f"{seq_len} tokens",
            "params": params, "weights_mb": Path(path).stat().st_size / 2**20}

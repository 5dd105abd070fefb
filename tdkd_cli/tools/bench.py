"""Inference benchmarks: latency percentiles, throughput, parameters and memory of several models
measured side by side in one run, and a regression gate against a baseline JSON file.

Models are timed round-robin (one call of each model per round) so that machine noise hits all of
them alike; ratios against the first model are therefore more trustworthy than absolute figures."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from ..core.errors import UsageError, VerificationError
from ..io.models import probe_inputs

DTYPES = ("float32", "bfloat16", "float16")
SCHEMA = "tdkd-bench/1"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS watermark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _prepare_torch(name: str, model, family: str, device: str, tdtype, batch_size: int, seq_len: int, graph=None) -> dict:
    model = model.eval().to(device=device, dtype=tdtype)
    if family == "pyg":
        return _prepare_graph(name, model, device, tdtype, batch_size, graph)
    inputs = probe_inputs(model, family, batch_size, seq_len, device=device, dtype=tdtype)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    if family == "hf":
        fn = (lambda m, i: m(**i))
    else:
        fn = (lambda m, i: m(i["x"]))
    shape = tuple(inputs["x"].shape[1:]) if family != "hf" else None
    return {"name": name, "model": model, "inputs": inputs, "fn": fn, "family": family,
            "input": f"{seq_len} tokens" if shape is None else "x".join(map(str, shape)),
            "params": params, "weights_mb": weight_bytes / 2**20, "times": [], "peak": None}


def _prepare_graph(name: str, model, device: str, tdtype, batch_size: int, graph) -> dict:
    """A graph model timed on a graph's test nodes (graph_ops.bench_inputs), or without a graph on
    a random ring of ``batch_size`` nodes."""
    from ..io import graph_models

    if graph is not None:
        from .graph_ops import bench_inputs

        inputs = bench_inputs(model, graph, device, tdtype)
    else:
        inputs = dict(graph_models.probe_inputs(model, batch_size, 0, device, tdtype), desc=f"{batch_size} random nodes")
        inputs["nodes"] = None
    desc = inputs.pop("desc")

    def fn(m, i):
        out = graph_models.forward(m, i["x"], i["edge_index"])
        return out if i["nodes"] is None else out[i["nodes"]]

    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in (*model.parameters(), *model.buffers()))
    return {"name": name, "model": model, "inputs": inputs, "fn": fn, "family": "pyg", "input": desc,
            "params": params, "weights_mb": weight_bytes / 2**20, "times": [], "peak": None}


def run(models: Sequence[tuple[str, object, str]], *, device: str, batch_size: int, seq_len: int, dtype: str,
        threads: int | None, warmup: int, iters: int, on_round: Callable[[], None] | None = None, graph=None) -> dict:
    """models: (name, nn.Module, family). Returns the report dict (schema tdkd-bench/1). With a
    ``graph``, graph models are timed on its test nodes (``batch_size`` becomes their number)."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if batch_size < 1 or seq_len < 1:
        raise UsageError("--batch-size and --seq-len must be at least 1")
    if iters < 3 or warmup < 0:
        raise UsageError("--iters must be at least 3 and --warmup at least 0")
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    tdtype = getattr(torch, dtype)
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    prepared = []
    for name, model, family in models:
        if family == "onnx":  # an ONNX file, run by onnxruntime (export.py)
            if cuda or dtype != "float32":
                raise UsageError(f"{name}: ONNX files are timed on CPU in float32 (onnxruntime's CPU provider)")
            from .export import prepare_bench

            prepared.append(dict(prepare_bench(model, batch_size, seq_len, threads), name=name, times=[], peak=None))
            continue
        prepared.append(_prepare_torch(name, model, family, device, tdtype, batch_size, seq_len, graph))
    if graph is not None:
        batch_size = len(graph.splits["test"])

    with torch.inference_mode():
        # Peak memory above what is resident before the model runs (activations, workspaces):
        # CUDA: allocator peak; CPU: the process's peak RSS watermark, reset before each model.
        for p in prepared:
            if cuda:
                sync()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                before = _proc_status_kb("VmRSS")
                tracked = before is not None and _reset_rss_peak()
            for _ in range(max(warmup, 1)):
                p["fn"](p["model"], p["inputs"])
            sync()
            if cuda:
                p["peak"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            elif tracked:
                hwm = _proc_status_kb("VmHWM")
                p["peak"] = None if hwm is None else max(hwm - before, 0) / 1024
        for _ in range(iters):
            for p in prepared:
                sync()
                t0 = time.perf_counter()
                p["fn"](p["model"], p["inputs"])
                sync()
                p["times"].append(time.perf_counter() - t0)
            if on_round:
                on_round()

    rows = []
    for p in prepared:
        ts = sorted(p["times"])
        med = statistics.median(ts)
        rows.append({
            "name": p["name"], "family": p["family"], "input": p["input"], "params": p["params"], "weights_mb": round(p["weights_mb"], 3),
            "median_ms": med * 1e3, "p90_ms": percentile(ts, 90) * 1e3, "p99_ms": percentile(ts, 99) * 1e3,
            "mean_ms": statistics.fmean(ts) * 1e3, "min_ms": ts[0] * 1e3,
            "throughput_per_s": batch_size / med,
            "peak_mem_mb": None if p["peak"] is None else round(p["peak"], 3),
        })
    base = rows[0]
    for r in rows:
        r["latency_ratio"] = r["median_ms"] / base["median_ms"]
        r["speedup"] = base["median_ms"] / r["median_ms"]
        r["params_ratio"] = r["params"] / base["params"]
    env = {"torch": torch.__version__, "device": device,
           "peak_mem": "cuda allocator peak above allocated before" if cuda else "process peak RSS above RSS before", "threads": torch.get_num_threads(),
           "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor() or None}
    if cuda:
        env["gpu"] = torch.cuda.get_device_name()
    return {"schema": SCHEMA, "settings": {"device": device, "batch_size": batch_size, "seq_len": seq_len,
                                           "dtype": dtype, "warmup": warmup, "iters": iters},
            "env": env, "models": rows}


def load_baseline(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"baseline {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"baseline {path} is not valid JSON") from None
    ok = isinstance(data, dict) and isinstance(data.get("models"), list) and all(
        isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("median_ms"), (int, float))
        and isinstance(m.get("latency_ratio", 1.0), (int, float)) for m in data["models"])
    if not ok:
        raise UsageError(f"baseline {path} is not a tdkd bench report (expected 'models' with name and median_ms)")
    return data


def regression_check(report: dict, baseline: dict, max_regression: float, gate: str = "latency") -> list[dict]:
    """Per model present in both: current vs baseline value of the gated figure; 'regressed' when
    current > baseline * (1 + max_regression). gate: 'latency' (median_ms) or 'ratio'
    (latency_ratio to the first model, machine independent)."""
    if not (max_regression >= 0 and math.isfinite(max_regression)):
        raise UsageError(f"--max-regression must be a non-negative number (got {max_regression})")
    key = {"latency": "median_ms", "ratio": "latency_ratio"}.get(gate)
    if key is None:
        raise UsageError(f"--gate must be 'latency' or 'ratio' (got {gate!r})")
    old = {m["name"]: m for m in baseline["models"]}
    out = []
    for m in report["models"]:
        if m["name"] not in old or key not in old[m["name"]]:
            out.append({"name": m["name"], "status": "no baseline"})
            continue
        before, now = float(old[m["name"]][key]), float(m[key])
        change = now / before - 1.0 if before > 0 else float("inf")
        out.append({"name": m["name"], "gate": key, "baseline": before, "current": now, "change": change,
                    "status": "regressed" if change > max_regression else "ok"})
    return out


def apply_gate(report: dict, baseline_path: Path, baseline: dict, max_regression: float, gate: str) -> VerificationError | None:
    """Add the regression check against ``baseline`` to ``report`` (key "regression"); the error
    to raise once the report is shown, when a model regressed by more than ``max_regression``."""
    models = regression_check(report, baseline, max_regression, gate)
    failed = [m for m in models if m["status"] == "regressed"]
    report["regression"] = {"baseline": str(baseline_path), "max_regression": max_regression, "gate": gate,
                            "models": models, "passed": not failed}
    if not failed:
        return None
    names = ", ".join(f"{m['name']} ({m['change']:+.1%})" for m in failed)
    return VerificationError(f"performance regression over {max_regression:.0%} against {baseline_path}: {names}")

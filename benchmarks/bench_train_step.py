"""Training-step time of `tdkd distill` variants, measured side by side in one process.

Each variant is a real run (train.prepare: the recipe, models, data, optimizer, teacher cache), and
the timed steps are Training.step() (every micro-batch's forward and backward, the teacher or its
cached outputs, the contraction of the cores, AdamW), round-robin over the variants on the same
batches (the same step numbers), so machine noise hits every variant alike. Variants that use the
teacher cache first run their first epoch untimed (it fills the cache); timed steps are from the
second epoch, where a user's run spends its time.

    .venv/bin/python benchmarks/bench_train_step.py cache       # bert-base -> tinybert, SST-2 sample
    .venv/bin/python benchmarks/bench_train_step.py opdf        # the sst2-b-kd / sst2-d-opdf recipes
    .venv/bin/python benchmarks/bench_train_step.py precision   # OPDF and dense KD, fp32 vs bf16
    .venv/bin/python benchmarks/bench_train_step.py profile     # where an OPDF step's time goes
    .venv/bin/python benchmarks/bench_train_step.py accum --train-limit 4096   # OPDF / dense KD at 1, 4, 8 micro-batches a step
    .venv/bin/python benchmarks/bench_train_step.py graph --teacher T/best --data builtin:citeseer   # GLNN and LSP students: dense / MPO / OPDF

Options: --steps N (timed steps per variant, default 20), --train-limit N (default 1024: 32 steps
per epoch at batch 32), --glue DIR (SST-2 for `opdf` and `precision`; default ../shared/data/glue).
Prints median seconds per step per variant and the ratios the comparison is about.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tdkd_cli  # noqa: E402,F401  (torchvision shim)


def variants(which: str, glue: str, limit: int, teacher: str | None = None, data: str = "builtin:cora") -> dict[str, dict]:
    sst2 = dict(data=f"{glue}/SST-2", task="sst2", train_limit=limit, max_length=64, student_layers="first-3",
                teacher="minilm", dev_split="none")
    if which == "cache":
        base = dict(data="builtin:sst2-sample", init="random", student="tinybert", train_limit=limit, max_length=64,
                    mpo=False, dev_split="none", batch_size=32)
        return {"fine-tune (no teacher)": dict(base, teacher="none"),
                "KD, teacher every step": dict(base, teacher="bert-base", teacher_cache=False),
                "KD, cached teacher": dict(base, teacher="bert-base")}
    if which == "opdf":
        return {"dense KD (sst2-b-kd)": dict(sst2, recipe="sst2-b-kd"),
                "OPDF (sst2-d-opdf)": dict(sst2, recipe="sst2-d-opdf"),
                "dense KD, no cache": dict(sst2, recipe="sst2-b-kd", teacher_cache=False),
                "OPDF, no cache": dict(sst2, recipe="sst2-d-opdf", teacher_cache=False)}
    if which == "accum":  # the cores are contracted once per optimizer step, whatever the accumulation
        return {f"{arm} accum {k}": dict(sst2, recipe=recipe, grad_accum=k)
                for k in (1, 4, 8) for arm, recipe in (("dense KD", "sst2-b-kd"), ("OPDF", "sst2-d-opdf"))}
    if which == "profile":
        return {"OPDF (sst2-d-opdf)": dict(sst2, recipe="sst2-d-opdf")}
    if which == "graph":  # one full-graph step per epoch: every timed step is the same forward and backward
        if not teacher:
            raise SystemExit("graph: pass --teacher DIR (a graph-teacher run's best/)")
        return {f"{kind} {arm}": dict(recipe=recipe, teacher=teacher, data=data, **opts)
                for kind, recipe in (("GLNN", "graph-glnn"), ("LSP", "graph-lsp"))
                for arm, opts in (("dense", dict(mpo=False, tensor_lambda=0.0)), ("MPO", dict(tensor_lambda=0.0)),
                                  ("OPDF", {}))}
    if which == "precision":
        return {"dense KD fp32": dict(sst2, recipe="sst2-b-kd"),
                "dense KD bf16": dict(sst2, recipe="sst2-b-kd", precision="bf16"),
                "OPDF fp32": dict(sst2, recipe="sst2-d-opdf"),
                "OPDF bf16": dict(sst2, recipe="sst2-d-opdf", precision="bf16")}
    raise SystemExit(f"unknown comparison {which!r}: cache | opdf | precision | accum | profile | graph")


RATIOS = {
    "cache": [("KD, cached teacher", "fine-tune (no teacher)"), ("KD, teacher every step", "fine-tune (no teacher)")],
    "opdf": [("OPDF (sst2-d-opdf)", "dense KD (sst2-b-kd)"), ("OPDF, no cache", "dense KD, no cache")],
    "precision": [("dense KD bf16", "dense KD fp32"), ("OPDF bf16", "OPDF fp32"), ("OPDF bf16", "dense KD fp32")],
    "accum": [(f"OPDF accum {k}", f"dense KD accum {k}") for k in (1, 4, 8)],
    "profile": [],
    "graph": [(f"{k} {arm}", f"{k} dense") for k in ("GLNN", "LSP") for arm in ("MPO", "OPDF")],
}


def profile(t, steps: int) -> None:
    """Median seconds of the parts of one OPDF step, each timed on its own."""
    import torch

    from tdkd_cli.engine import precision
    from tdkd_cli.tensor import tensorize

    cores = [c for m in tensorize.mpo_modules(t.model).values() for c in tensorize.layer_cores(m)]

    def contract():
        with torch.no_grad(), precision.autocast(t.device, t.r.precision):
            tensorize.RebuiltWeights(t.model, grad=False).release()

    def contract_and_back():
        with precision.autocast(t.device, t.r.precision):
            rebuilt = tensorize.RebuiltWeights(t.model, grad=True)
        for _, _, leaf in rebuilt.entries:
            leaf.grad = torch.ones_like(leaf)
        rebuilt.backward()
        rebuilt.release()
        for c in cores:
            c.grad = None

    def tensor_term():
        for term, w in t.step_terms:
            (w * term.compute(None, None, None, t.ctx)).backward()

    def adamw():
        for p in t.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        t.optimizer.step()

    def whole():
        t.progress.step = t.batches.steps_per_epoch
        t.step()

    parts = {"whole step": whole, "contraction forward": contract, "contraction forward + backward": contract_and_back,
             "tensor constraint forward + backward": tensor_term, "AdamW update": adamw}
    times = {k: [] for k in parts}
    for k in range(steps + 1):
        for name, f in parts.items():
            t0 = time.perf_counter()
            f()
            if k > 0:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in parts:
        print(f"{name:38s} {med[name]:8.4f} s  ({med[name] / med['whole step']:.0%} of the step)")


def build(settings: dict, out: Path):
    from tdkd_cli.core import recipe as recipe_mod
    from tdkd_cli.engine import train

    settings = dict(settings)
    name = settings.pop("recipe", None)
    values = dict(recipe_mod.read(name)) if name else {}
    values.update(settings, epochs=2.0, eval_every=0, save_every=0, log_every=1000)
    r = recipe_mod.Recipe.from_dict({**recipe_mod.defaults(), **recipe_mod.validate(values, "bench")})
    training, _ = train.prepare(r, out, force=True)
    return training


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comparison", choices=sorted(RATIOS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--train-limit", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=None, help="override every variant's batch size")
    ap.add_argument("--glue", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    ap.add_argument("--teacher", default=None, help="graph: the GCN teacher (a graph-teacher run's best/)")
    ap.add_argument("--data", default="builtin:cora", help="graph: the graph (builtin:cora, builtin:citeseer, ...)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tdkd-bench-"))
    os.environ.setdefault("TDKD_CACHE", str(tmp / "cache"))  # a fresh teacher cache unless one is given
    chosen = variants(a.comparison, a.glue, a.train_limit, a.teacher, a.data)
    if a.batch_size:
        chosen = {name: dict(s, batch_size=a.batch_size) for name, s in chosen.items()}
    runs = {name: build(s, tmp / f"run{i}") for i, (name, s) in enumerate(chosen.items())}
    for t in runs.values():  # the first epoch, untimed: fills the teacher caches
        if t.teacher_cache is not None:
            for _ in range(t.batches.steps_per_epoch):
                t.step()
    if a.comparison == "profile":
        print(f"# profile of one OPDF step (sst2-d-opdf, batch {next(iter(runs.values())).r.batch_size}, epoch 2, "
              f"{torch.get_num_threads()} CPU threads), parts timed round-robin, {a.steps} rounds (median)")
        return profile(next(iter(runs.values())), a.steps)
    times = {name: [] for name in runs}
    for k in range(a.steps + 1):
        for name, t in runs.items():
            e = t.batches.steps_per_epoch
            t.progress.step = e + (k % e)  # the same batches for every variant (of one accumulation)
            t0 = time.perf_counter()
            t.step()
            if k > 0:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    data = (f"{a.data}, full graph" if a.comparison == "graph" else
            f"train_limit {a.train_limit}, batch {next(iter(runs.values())).r.batch_size}")
    print(f"# {a.comparison}: {a.steps} timed steps per variant from epoch 2 (median), round-robin, "
          f"{torch.get_num_threads()} CPU threads, {data}")
    for name, t in runs.items():
        params = sum(p.numel() for p in t.model.parameters())
        cache = "cache on" if t.teacher_cache is not None else "no cache"
        print(f"{name:28s} {med[name]:8.4f} s/step  {params:>12,d} params  {t.r.precision}  {cache}")
    for num, den in RATIOS[a.comparison]:
        print(f"{num} / {den}: {med[num] / med[den]:.3f}")


if __name__ == "__main__":
    main()

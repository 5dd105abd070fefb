"""Over-parameterized CNNs, side by side in one run (round-robin, so machine noise hits every variant alike):

1. inference: a merged CNN (decomposed into MPOs with tdkd's default CNN targets, then contracted
   back) against the same dense CNN, timed by `tdkd bench`'s own loop (tdkd_cli.tools.bench.run);
   the merged model is the plain architecture, so the ratio should be 1.00 +/- noise;
2. training: time per optimizer step of the MPO student against the same dense student (forward +
   backward + AdamW, the cores contracted once per step as `tdkd distill` does).

    .venv/bin/python benchmarks/bench_cnn.py [--model resnet18] [--size 224] [--batch 16] [--iters 20]
    .venv/bin/python benchmarks/bench_cnn.py --model resnet-digits-small --size 32 --batch 64

Random init (offline); CPU threads as torch picks. Prints medians and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tdkd_cli  # noqa: E402,F401  (installs the torchvision shim before timm is imported)


def build(spec: str, size: int, mpo_n: int | None):
    from tdkd_cli.io import models
    from tdkd_cli.tensor import tensorize

    loaded = models.load_model(spec, init="random", num_labels=10, seed=0)
    model = loaded.model
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, size, size))
    if mpo_n:
        names = tensorize.select_targets(model, tensorize.default_targets(model, "timm"))
        tensorize.tensorize(model, tensorize.plan_layers(model, names, mpo_n))
    return model


def train_step(model, opt, x, y) -> float:
    import torch.nn.functional as F

    from tdkd_cli.tensor import tensorize

    t0 = time.perf_counter()
    with tensorize.RebuiltWeights(model) as rebuilt:
        F.cross_entropy(model(x), y).backward()
        rebuilt.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    import torch

    from tdkd_cli.tools import bench
    from tdkd_cli.tensor import tensorize
    from tdkd_cli.engine.optim import make_optimizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="timm model name or a tdkd preset")
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--train-iters", type=int, default=8)
    ap.add_argument("--n", type=int, default=5)
    a = ap.parse_args()

    dense = build(a.model, a.size, None)
    merged = build(a.model, a.size, a.n)
    tensorize.merge(merged)
    report = bench.run([("dense", dense, "timm"), ("merged", merged, "timm")], device="cpu", batch_size=a.batch,
                       seq_len=1, dtype="float32", threads=None, iters=a.iters, warmup=3)
    rows = {r["name"]: r for r in report["models"]}
    print(f"# {a.model}, input 3x{a.size}x{a.size}, batch {a.batch}, n={a.n}, {torch.get_num_threads()} CPU threads")
    print(f"inference, median ms: dense {rows['dense']['median_ms']:.2f}, merged {rows['merged']['median_ms']:.2f} "
          f"({a.iters} rounds)")
    print(f"merged / dense latency: {rows['merged']['latency_ratio']:.3f}")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    variants = {"dense": build(a.model, a.size, None), "MPO": build(a.model, a.size, a.n)}
    opts = {k: make_optimizer([{"params": list(m.parameters())}], 1e-4) for k, m in variants.items()}
    times = {k: [] for k in variants}
    for k, m in variants.items():
        m.train()
        train_step(m, opts[k], x, y)  # warm-up
    for _ in range(a.train_iters):
        for k, m in variants.items():
            times[k].append(train_step(m, opts[k], x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in variants.items()}
    print(f"training step, median s: dense {med['dense']:.3f}, MPO {med['MPO']:.3f} ({a.train_iters} rounds)")
    print(f"MPO / dense train step: {med['MPO'] / med['dense']:.3f}")
    print(f"parameters while training, MPO / dense: {params['MPO'] / params['dense']:.3f} "
          f"({params['MPO']:,d} / {params['dense']:,d})")


if __name__ == "__main__":
    main()

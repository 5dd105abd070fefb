"""Time per optimizer step: the over-parameterized (MPO, n=5) student against the same dense
student, side by side in one run (round-robin, so machine noise hits every variant alike).

    .venv/bin/python benchmarks/bench_distill_step.py [--width 384] [--layers 6] [--batch 32] [--seq 128] [--iters 6]

A step is what `tdkd distill` does per optimizer step on the student: dense weights rebuilt from the
cores once (tensorize.RebuiltWeights), forward + backward of every micro-batch, one backward through
the contractions, AdamW update. Variants: dense and MPO, each with grad_accum 1 and 4 (batch 32 per
micro-batch), plus, for accum 4, the naive MPO step that contracts the cores on every micro-batch
(what a plain parametrization does) to show what rebuilding once per step saves.
Prints median seconds per step and the ratios. Random init (offline); CPU threads as torch picks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tdkd_cli  # noqa: E402,F401  (installs the torchvision shim before transformers is imported)


def build(width: int, layers: int, mpo_n: int | None, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tdkd_cli.tensor import tensorize
    from tdkd_cli.engine.optim import make_optimizer

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=width, num_hidden_layers=layers, num_attention_heads=12,
                     intermediate_size=4 * width, num_labels=2)
    model = BertForSequenceClassification(cfg).train()
    if mpo_n:
        names = tensorize.select_targets(model, tensorize.default_targets(model, "hf"))
        tensorize.tensorize(model, tensorize.plan_layers(model, names, mpo_n))
    opt = make_optimizer([{"params": list(model.parameters())}], 1e-5)
    return model, opt


def step(model, opt, batches, once: bool) -> float:
    from tdkd_cli.methods import losses
    from tdkd_cli.tensor import tensorize

    t0 = time.perf_counter()
    rebuilt = tensorize.RebuiltWeights(model) if once else None
    for ids, labels in batches:
        loss = losses.ce_loss(model(input_ids=ids).logits, labels) / len(batches)
        loss.backward()
    if rebuilt is not None:
        rebuilt.backward()
        rebuilt.release()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--n", type=int, default=5)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)

    def batches(k):
        return [(torch.randint(1000, 30000, (a.batch, a.seq), generator=g), torch.randint(0, 2, (a.batch,), generator=g))
                for _ in range(k)]

    variants = {
        "dense, accum 1": (build(a.width, a.layers, None), 1, True),
        "MPO, accum 1": (build(a.width, a.layers, a.n), 1, True),
        "dense, accum 4": (build(a.width, a.layers, None), 4, True),
        "MPO, accum 4": (build(a.width, a.layers, a.n), 4, True),
        "MPO, accum 4, contract per micro-batch": (build(a.width, a.layers, a.n), 4, False),
    }
    params = {k: sum(p.numel() for p in v[0][0].parameters()) for k, v in variants.items()}
    times = {k: [] for k in variants}
    for name, ((model, opt), k, once) in variants.items():  # warm-up
        step(model, opt, batches(k), once)
    for _ in range(a.iters):
        for name, ((model, opt), k, once) in variants.items():
            times[name].append(step(model, opt, batches(k), once))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# {a.layers}-layer BERT student, width {a.width}, n={a.n}, batch {a.batch} x seq {a.seq} per micro-batch, "
          f"{torch.get_num_threads()} CPU threads, {a.iters} timed steps per variant (median)")
    print(f"{'variant':42s} {'params':>12s} {'s/step':>8s}")
    for k in variants:
        print(f"{k:42s} {params[k]:12,d} {med[k]:8.3f}")
    print(f"MPO / dense, accum 1: {med['MPO, accum 1'] / med['dense, accum 1']:.3f}")
    print(f"MPO / dense, accum 4: {med['MPO, accum 4'] / med['dense, accum 4']:.3f}")
    print(f"MPO contract-per-micro-batch / rebuild-once, accum 4: "
          f"{med['MPO, accum 4, contract per micro-batch'] / med['MPO, accum 4']:.3f}")
    print(f"parameters while training, MPO / dense: {params['MPO, accum 1'] / params['dense, accum 1']:.3f}")


if __name__ == "__main__":
    main()

"""Decomposition and contraction timings of the MPO core (CPU, random BERT-base-shaped weights).

1. Decompose all 72 target matrices of a 12-layer BERT-base-shaped model (n=5, paper shapes):
   total and per-matrix seconds.
2. Contract one 3072x768 n=5 MPO (shapes [64,1,1,1,48] x [32,1,1,1,24]) in tdkd's cheapest order
   and in the plain left-to-right order, measured side by side; prints the ratio.

Usage: python benchmarks/bench_mpo.py [--threads 2] [--json]
"""

import argparse
import json
import time

import torch
import torch.utils.benchmark as tb

import tdkd_cli  # noqa: F401  (torchvision shim)
from tdkd_cli import mpo, tensorize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    names = tensorize.select_targets(model, tensorize.BERT_TARGETS)
    plans = tensorize.plan_layers(model, names, 5)
    per = {"768x768": [], "3072x768": [], "768x3072": []}
    t0 = time.perf_counter()
    last = t0

    def on_layer(plan):
        nonlocal last
        now = time.perf_counter()
        per[f"{plan.out_features}x{plan.in_features}"].append(now - last)
        last = now

    tensorize.tensorize(model, plans, progress=on_layer)
    total = time.perf_counter() - t0

    w = torch.randn(3072, 768) * 0.02
    cores = mpo.decompose(w, (64, 1, 1, 1, 48), (32, 1, 1, 1, 24))
    sizes = [64 * 32, 1, 1, 1, 48 * 24]
    bonds = [1] + [c.shape[-1] for c in cores]
    timers = {order: tb.Timer("contract(cores, order)", globals={"contract": mpo.contract, "cores": cores, "order": order},
                              num_threads=args.threads) for order in ("optimal", "left")}
    # Interleave the two measurements so machine noise hits both alike.
    samples = {"optimal": [], "left": []}
    for _ in range(5):
        for order, t in timers.items():
            samples[order].append(t.timeit(3).median)
    med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    res = {
        "matrices": len(plans), "decompose_total_s": total,
        "decompose_per_matrix_s": {k: sum(v) / len(v) for k, v in per.items()},
        "contract_3072x768_optimal_s": med["optimal"], "contract_3072x768_left_s": med["left"],
        "left_over_optimal_time_ratio": med["left"] / med["optimal"],
        "left_over_optimal_flop_ratio": mpo.contraction_cost(bonds, sizes, "left") / mpo.contraction_cost(bonds, sizes, "optimal"),
        "threads": args.threads, "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"decompose {res['matrices']} BERT-base matrices (n=5): {total:.1f} s total")
    for k, v in res["decompose_per_matrix_s"].items():
        print(f"  {k}: {v:.3f} s per matrix ({len(per[k])} matrices)")
    print(f"contract one 3072x768 n=5 MPO: optimal order {med['optimal'] * 1e3:.1f} ms, left-to-right {med['left'] * 1e3:.1f} ms")
    print(f"  left-to-right / optimal: time x{res['left_over_optimal_time_ratio']:.2f}, multiply-adds x{res['left_over_optimal_flop_ratio']:.2f}")


if __name__ == "__main__":
    main()

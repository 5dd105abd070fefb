"""Decomposition and contraction timings of the MPO core (CPU, random BERT-base-shaped weights).

1. Decompose all 72 target matrices of a 12-layer BERT-base-shaped model (n=5, paper shapes):
   total and per-matrix seconds, against one plain float64 SVD (torch.linalg.svd) of each matrix in
   its Kronecker-rearranged form (the obvious exact method), matrix by matrix side by side; prints
   the ratio and the largest reconstruction error of tdkd's cores.
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
from tdkd_cli.tensor import mpo, tensorize


def _rearranged(w: torch.Tensor, plan) -> torch.Tensor:
    """The float64 matrix (i_1 j_1, rest) whose SVD is the first step of TT-SVD for this plan."""
    n = len(plan.out_shape)
    view = w.reshape(*plan.out_shape, *plan.in_shape).permute([x for k in range(n) for x in (k, n + k)])
    t = torch.empty(view.shape, dtype=torch.float64).copy_(view)  # one copy, as mpo.decompose makes
    return t.reshape(plan.out_shape[0] * plan.in_shape[0], -1)


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
    modules = dict(model.named_modules())
    total = svd_total = 0.0
    max_err = 0.0
    for plan in plans[:3]:  # warm-up, one matrix of each shape (allocator, LAPACK workspaces)
        w = modules[plan.name].weight.detach()
        mpo.decompose(w, plan.out_shape, plan.in_shape)
        torch.linalg.svd(_rearranged(w, plan), full_matrices=False)
    for plan in plans:  # alternate tdkd's decomposition and the plain SVD, matrix by matrix
        w = modules[plan.name].weight.detach()
        t0 = time.perf_counter()
        cores = mpo.decompose(w, plan.out_shape, plan.in_shape)
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.linalg.svd(_rearranged(w, plan), full_matrices=False)
        svd_total += time.perf_counter() - t0
        total += dt
        per[f"{plan.out_features}x{plan.in_features}"].append(dt)
        max_err = max(max_err, mpo.relative_error(mpo.contract([c.double() for c in cores]), w))

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
        "matrices": len(plans), "decompose_total_s": total, "svd_total_s": svd_total,
        "decompose_over_svd": total / svd_total, "max_rel_error": max_err,
        "decompose_per_matrix_s": {k: sum(v) / len(v) for k, v in per.items()},
        "contract_3072x768_optimal_s": med["optimal"], "contract_3072x768_left_s": med["left"],
        "left_over_optimal_time_ratio": med["left"] / med["optimal"],
        "left_over_optimal_flop_ratio": mpo.contraction_cost(bonds, sizes, "left") / mpo.contraction_cost(bonds, sizes, "optimal"),
        "threads": args.threads, "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"decompose {res['matrices']} BERT-base matrices (n=5): {total:.1f} s total; one float64 SVD per "
          f"rearranged matrix: {svd_total:.1f} s; ratio {total / svd_total:.2f}; max rel. error {max_err:.1e}")
    for k, v in res["decompose_per_matrix_s"].items():
        print(f"  {k}: {v:.3f} s per matrix ({len(per[k])} matrices)")
    print(f"contract one 3072x768 n=5 MPO: optimal order {med['optimal'] * 1e3:.1f} ms, left-to-right {med['left'] * 1e3:.1f} ms")
    print(f"  left-to-right / optimal: time x{res['left_over_optimal_time_ratio']:.2f}, multiply-adds x{res['left_over_optimal_flop_ratio']:.2f}")


if __name__ == "__main__":
    main()

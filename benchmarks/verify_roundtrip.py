"""Check a merged checkpoint against the model it came from: every tensor and the logits on real
sentences. Used by `make demo`.

Usage: python benchmarks/verify_roundtrip.py MODEL MERGED_DIR [--num-labels 2]
"""

import argparse
import sys

import torch

import tdkd_cli  # noqa: F401
from tdkd_cli.io import models


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("merged")
    ap.add_argument("--num-labels", type=int, default=2)
    args = ap.parse_args()
    ref = models.load_model(args.model, num_labels=args.num_labels, seed=0)
    new = models.load_dense_dir(args.merged)
    worst = 0.0
    for key, a in ref.model.state_dict().items():
        b = new.model.state_dict()[key]
        worst = max(worst, float(torch.linalg.norm(a.double() - b.double()) / max(float(torch.linalg.norm(a.double())), 1e-30)))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ref.tokenizer_dir or args.merged))
    batch = tok(["a gripping, beautifully acted film", "the plot is thin and the jokes fall flat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = float((ref.model(**batch).logits - new.model(**batch).logits).abs().max())
    print(f"merged vs original: max relative Frobenius error over all tensors {worst:.2e}; max |logit diff| on real sentences {diff:.2e}")
    ok = worst <= 1e-6 and diff <= 1e-5
    print("round trip OK" if ok else "round trip FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""tdkd in a plain PyTorch loop on timm CNNs: a ResNet teacher, an over-parameterized (MPO) narrow
ResNet student distilled with logit KD + FitNets hints on the last stage + the OPDF tensor
constraint, saved and reloaded in tdkd's checkpoint format, then merged back and loaded into a
plain ``timm.create_model`` of the student's architecture.

    python examples/timm_loop.py --out /tmp/timm-student [--steps 60]

Data: scikit-learn's real 8x8 digit scans (1,797 images, 10 classes) at 16x16; the last 297 are
held out. About half a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tdkd_cli import (DistillLoss, MPOConfig, TensorConstraint, load_mpo, merge, overparameterize, param_groups,
                      save_mpo)

TEACHER = dict(layers=[2, 2, 2, 2], channels=[32, 64, 128, 256], stem_width=32, in_chans=1)
STUDENT = dict(layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], stem_width=16, in_chans=1)


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def batches(x, y, steps: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (size,), generator=g)
        yield {"x": x[idx]}, y[idx]


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv=None) -> dict:
    import timm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (xt, yt), (xd, yd) = digits()

    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=10, **TEACHER)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for batch, labels in batches(xt, yt, args.steps, 64, seed=0):  # the teacher: plain cross-entropy
        teacher.train()
        loss = F.cross_entropy(teacher(batch["x"]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()

    torch.manual_seed(1)
    student = timm.create_model("resnet18", num_classes=10, **STUDENT)
    overparameterize(student, MPOConfig(n=3), teacher=teacher)  # every Conv2d -> 3 cores, shapes aligned by stage
    distill = DistillLoss(student, teacher, ["fitnet:weight=1,student=layer4,teacher=layer4"], kd=1.0, temperature=4.0,
                          ce=1.0, example={"x": xt[:8]})
    constraint = TensorConstraint(student, teacher)
    opt = torch.optim.AdamW(param_groups(student, lr=3e-3, mpo_lr=1e-3) + distill.param_groups(lr=3e-3))
    losses = []
    for batch, labels in batches(xt, yt, args.steps, 64, seed=1):
        student.train()
        s_logits = student(batch["x"])
        with torch.no_grad():
            t_logits = teacher(batch["x"])
        loss = distill(s_logits, t_logits, {"labels": labels}) + 10.0 * constraint()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    distill.close()

    save_mpo(student, args.out / "student-mpo", timm_kwargs=STUDENT, force=True)  # `tdkd merge` / `tdkd eval` read it
    reloaded = load_mpo(args.out / "student-mpo")
    mpo_acc, reloaded_acc = accuracy(student, xd, yd), accuracy(reloaded, xd, yd)
    merge(student)
    plain = timm.create_model("resnet18", num_classes=10, **STUDENT)
    plain.load_state_dict(student.state_dict())
    result = {"teacher_acc": accuracy(teacher, xd, yd), "student_mpo_acc": mpo_acc, "reloaded_mpo_acc": reloaded_acc,
              "merged_plain_timm_acc": accuracy(plain, xd, yd), "first_loss": losses[0], "last_loss": losses[-1],
              "connectors": list(distill.connectors.keys())}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

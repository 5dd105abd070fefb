"""CRD and cross-architecture KD on builtin:digits, one seed each (resumable: rerun to continue).

    .venv/bin/python benchmarks/contrastive_digits.py --out runs/contrastive     # runs, then prints the table

Teachers: the resnet-digits ResNet (recipes/digits-cnn-teacher) and the vit-digits ViT
(recipes/digits-teacher), both trained here from scratch and merged. Students: resnet-digits-small
from random weights, MPO (n=5), 10 epochs, every run a shipped recipe:
  cnn-kd      ResNet teacher, KD + tensor constraint            (recipes/digits-cnn)
  cnn-crd     ResNet teacher, CRD + KD + tensor constraint      (recipes/digits-crd)
  vit-kd      ViT teacher, KD only                              (digits-hetero without its hint)
  vit-fitnet  ViT teacher, FitNets across layouts + KD          (recipes/digits-hetero)
  vit-crd     ViT teacher, CRD + KD                             (digits-hetero with CRD instead)
Each best checkpoint is merged with `tdkd merge` (verified), loaded into a plain
`timm.create_model` of the student's architecture, and scored with `tdkd eval` on the 360 dev images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opdf_experiments import distill, tdkd  # noqa: E402

TEACHERS = {"cnn": "digits-cnn-teacher", "vit": "digits-teacher"}
ARMS = {
    "cnn-kd": ("cnn", ["--recipe", "digits-cnn", "--student", "resnet-digits-small", "--init", "random"]),
    "cnn-crd": ("cnn", ["--recipe", "digits-crd", "--student", "resnet-digits-small", "--init", "random"]),
    "vit-kd": ("vit", ["--recipe", "digits-cnn", "--student", "resnet-digits-small", "--init", "random",
                       "--tensor-lambda", "0"]),
    "vit-fitnet": ("vit", ["--recipe", "digits-hetero"]),
    "vit-crd": ("vit", ["--recipe", "digits-hetero", "--method", "crd:weight=0.8,student=layer4,teacher=blocks.5"]),
}


def teacher(out: Path, kind: str) -> Path:
    run, merged = out / f"{kind}-teacher-run", out / f"{kind}-teacher"
    distill(run, "--recipe", TEACHERS[kind])
    if not merged.is_dir():
        tdkd("merge", str(run / "best"), "-o", str(merged), "--json", capture=True)
    return merged


def score(out: Path, name: str) -> dict:
    result = out / name / "scores.json"
    if result.is_file():
        return json.loads(result.read_text())
    merged = out / f"{name}-merged"
    tdkd("merge", str(out / name / "best"), "-o", str(merged), "--force", "--json", capture=True)
    plain_timm(merged)
    ev = json.loads(tdkd("eval", str(merged), "--data", "builtin:digits", "--json", capture=True))
    summary = json.loads((out / name / "summary.json").read_text())
    res = {"dev_top1": ev["metrics"]["top1"], "recorded_top1": summary["best"]["value"],
           "seconds_per_step": summary["seconds_per_step"], "connectors": summary.get("connectors")}
    (out / name / "scores.json").write_text(json.dumps(res))
    return res


def plain_timm(merged: Path) -> None:
    """The merged student loads into a plain timm model of its architecture (strict)."""
    import timm
    from safetensors.torch import load_file

    cfg = json.loads((merged / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg.get("model_args", {}))
    model.load_state_dict(load_file(str(merged / "model.safetensors")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    teachers = {k: teacher(a.out, k) for k in TEACHERS}
    rows = []
    for name, (kind, opts) in ARMS.items():
        distill(a.out / name, *opts, "--teacher", str(teachers[kind]))
        rows.append((name, score(a.out, name)))
    t_scores = {k: json.loads(tdkd("eval", str(v), "--data", "builtin:digits", "--json", capture=True))["metrics"]["top1"]
                for k, v in teachers.items()}
    print(f"teachers (dev top-1): ResNet {100 * t_scores['cnn']:.2f}, ViT {100 * t_scores['vit']:.2f}\n")
    print("| run | dev top-1 (merged, plain timm loads it) | = recorded best | s/step | connectors |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        same = "yes" if abs(r["dev_top1"] - r["recorded_top1"]) < 1e-9 else "NO"
        print(f"| {name} | {100 * r['dev_top1']:.2f} | {same} | {r['seconds_per_step']} | {'; '.join(r['connectors'] or []) or '-'} |")


if __name__ == "__main__":
    main()

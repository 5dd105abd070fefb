"""Data-free distillation on digits: a student that never sees a real training image, against the
same student distilled on the real images and one distilled on random noise (the floor).

    python benchmarks/datafree_digits.py --out runs/datafree            # resumable: rerun to continue
    python benchmarks/datafree_digits.py --out runs/datafree --table    # only print the table

1. teacher: `tdkd distill --recipe digits-cnn-teacher` (resnet-digits, trained on the real train split
   of builtin:digits), merged;
2. `tdkd synthesize` 2,000 images from the teacher alone (--count, --steps; the command's defaults otherwise);
3. a folder of 2,000 uniform-noise images of the same size (class i mod 10: labels unused, alpha = 1);
4. three students, the same recipe for each (digits-datafree: resnet-digits-small as an n=5 MPO
   student, pure logit KD at T=4 + the tensor constraint, 300 steps of 64, evaluated on the real dev
   split: 360 images, dev_data builtin:digits): on the real train split, on the synthesized images,
   on the noise.
Every step is skipped when its output exists (runs are resumed), so an interrupted run continues.
Prints a markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opdf_experiments import distill, tdkd  # noqa: E402
from tdkd_cli.io.checkpoint import atomic_write_text  # noqa: E402


def noise_folder(path: Path, count: int, size: int, seed: int = 0) -> None:
    """count uniform-noise RGB images, image i in class i mod 10, written atomically."""
    import numpy as np
    from PIL import Image

    from tdkd_cli.io.checkpoint import atomic_dir

    if path.exists():
        return
    rng = np.random.default_rng(seed)
    with atomic_dir(path, what="noise images") as tmp:
        for i in range(count):
            cls = tmp / "train" / str(i % 10)
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(cls / f"{i:06d}.png")


def timed(path: Path, fn) -> float:
    """Run fn once (skipped when its time is recorded in path); its wall seconds."""
    if path.is_file():
        return float(path.read_text())
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    atomic_write_text(path, f"{seconds:.1f}\n")
    return seconds


def run(a) -> dict:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher"
    t_teacher = timed(out / "teacher.seconds", lambda: (
        distill(out / "teacher-run", "--recipe", "digits-cnn-teacher"),
        tdkd("merge", str(out / "teacher-run" / "best"), "-o", str(teacher), "--force", capture=True)))
    if not (out / "teacher-eval.json").is_file():
        atomic_write_text(out / "teacher-eval.json", tdkd("eval", str(teacher), "--data", "builtin:digits", "--json", capture=True))
    synth = out / "synth"
    t_synth = timed(out / "synth.seconds", lambda: tdkd(
        "synthesize", str(teacher), "--count", str(a.count), "--steps", str(a.steps), "--classes", "builtin:digits",
        "-o", str(synth), "--json", capture=True))
    noise_folder(out / "noise", a.count, 32)
    common = ["--recipe", "digits-datafree", "--teacher", str(teacher), "--max-steps", str(a.student_steps)]
    arms = {"real": "builtin:digits", "synthesized": str(synth), "noise": str(out / "noise")}
    secs = {}
    for arm, data in arms.items():
        if a.arms and arm not in a.arms:
            continue
        secs[arm] = timed(out / f"student-{arm}.seconds", lambda: distill(out / f"student-{arm}", *common, "--data", data))
    results = {"teacher_seconds": t_teacher, "synth_seconds": t_synth, "student_seconds": secs,
               "teacher": json.loads((out / "teacher-eval.json").read_text()), "synthesis": json.loads((synth / "synthesis.json").read_text())["generator_log"][-1]}
    for arm in arms:
        results[arm] = _dev(out / f"student-{arm}")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _dev(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {"best_top1": s["best"]["value"] if s.get("best") else None, "final": s["final_metrics"],
            "train_examples": s["train_examples"], "steps": s["steps"], "seconds_per_step": s["seconds_per_step"]}


def grid(folder: Path, out_png: Path, per_class: int = 10, scale: int = 2, real: Path | None = None) -> None:
    """A PNG grid of images per class (one row per class, ``per_class`` images, the first ones); with
    ``real`` a first column of one real image per class, set apart by a gap."""
    from PIL import Image, ImageDraw

    from tdkd_cli.io import data as data_mod

    images = data_mod.load_images(folder, "train")
    reals = data_mod.load_images(real, "train") if real is not None else None
    side, pad, label = 32 * scale, 2, 20
    left = label + (side + 3 * pad if reals is not None else 0)
    canvas = Image.new("RGB", (left + per_class * (side + pad), len(images.classes) * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, cls in enumerate(images.classes):
        y = row * (side + pad)
        draw.text((6, y + side // 2 - 6), cls, fill="black")
        if reals is not None:
            f = reals.files[reals.labels.index(row)]
            canvas.paste(Image.open(f).convert("RGB").resize((side, side), Image.BILINEAR), (label, y))
        files = [f for f, lab in zip(images.files, images.labels) if lab == row][:per_class]
        for col, f in enumerate(files):
            canvas.paste(Image.open(f).convert("RGB").resize((side, side), Image.NEAREST), (left + col * (side + pad), y))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, optimize=True)


def table(results: dict) -> str:
    rows = ["| model | training inputs | real dev top-1 (360 images) |", "|---|---|---|",
            f"| teacher resnet-digits (2.8M) | 1,437 real images, labels | {100 * results['teacher']['metrics']['top1']:.2f} |"]
    names = {"real": "1,437 real images (KD)", "synthesized": "2,000 synthesized images (KD), no real image",
             "noise": "2,000 uniform-noise images (KD): the floor"}
    for arm, what in names.items():
        r = results[arm]
        rows.append(f"| student resnet-digits-small, MPO | {what} | {100 * r['best_top1']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/datafree")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--steps", type=int, default=200, help="generator steps of tdkd synthesize")
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--arms", nargs="*", default=None, help="train only these students (real, synthesized, noise) this time")
    p.add_argument("--table", action="store_true", help="only print the table of finished results")
    p.add_argument("--figure", default=None, help="also draw the synthesized images per class into this PNG")
    a = p.parse_args()
    results = json.loads((Path(a.out) / "results.json").read_text()) if a.table else run(a)
    print(table(results))
    if a.figure:
        from tdkd_cli.io.data import resolve_data

        grid(Path(a.out) / "synth", Path(a.figure), real=resolve_data("builtin:digits")[0])
    print(f"\nwall seconds: teacher {results['teacher_seconds']:.0f}, synthesis {results['synth_seconds']:.0f}, "
          + ", ".join(f"student ({k}) {v:.0f}" for k, v in results["student_seconds"].items()))


if __name__ == "__main__":
    main()

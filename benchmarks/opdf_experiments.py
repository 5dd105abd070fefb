"""The SST-2 / RTE experiments of docs/results.md, run with tdkd itself.

    python benchmarks/opdf_experiments.py run --task sst2 --glue ../shared/data/glue --seeds 1 2 3
    python benchmarks/opdf_experiments.py table            # prints the markdown table
    python benchmarks/opdf_experiments.py investigate --task sst2   # the attempts (ATTEMPTS below)
    python benchmarks/opdf_experiments.py attempts --task sst2      # their table, next to the main grid
    python benchmarks/opdf_experiments.py curves --task sst2 --outs runs/exp runs/exp-mpolr  # dev acc. by step

For a task: fine-tune the teacher (tdkd_cli/recipes/<task>-teacher.yaml) and merge it; then for each seed and
arm a (fine-tune), b (KD), c (KD + MPO), d (OPDF: KD + MPO + tensor constraint) run
`tdkd distill --recipe <task>-<arm>`, merge the best checkpoint (`tdkd merge`, verified) and score
the merged student with `tdkd eval`. Finished runs are skipped and unfinished ones resumed, so the
command can be rerun after an interruption. Everything lands under --out (default runs/exp).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdkd_cli.io.checkpoint import atomic_write_text  # noqa: E402

ARMS = {"a": "a-finetune", "b": "b-kd", "c": "c-kd-mpo", "d": "d-opdf"}
ARM_NAMES = {"a": "(a) fine-tune, no teacher", "b": "(b) logit KD", "c": "(c) KD + MPO, lambda=0",
             "d": "(d) OPDF: KD + MPO + constraint"}
TASK_DIRS = {"sst2": "SST-2", "rte": "RTE"}
# Investigation of docs/results.md: one change against the main grid per attempt, written to
# <base>-<name>/<task>/<arm>-s<seed>, teacher reused from the main grid.
ATTEMPTS = {
    "mpolr": (["--mpo-lr", "2e-5"], "cd", ("sst2", "rte")),
    "mpolr5e6": (["--mpo-lr", "5e-6"], "cd", ("sst2",)),
    "lam1000": (["--tensor-lambda", "1000"], "d", ("sst2",)),
    "layermap": (["--layer-map", "0,1,2"], "d", ("sst2",)),
    "everyother": (["--student-layers", "every-other"], "bd", ("sst2",)),
    "n3": (["--mpo-n", "3"], "d", ("sst2",)),
}


def tdkd(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "tdkd_cli", *args]
    print("+ tdkd " + " ".join(args), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): tdkd {' '.join(args)}")
    return p.stdout if capture else ""


def finished(run: Path) -> bool:
    try:
        return json.loads((run / "run.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def distill(run: Path, *options: str) -> None:
    """`tdkd distill OPTIONS -o RUN --json`, resumed if it ran before, skipped if it finished; its
    JSON summary kept as RUN/summary.json."""
    if finished(run) and (run / "summary.json").is_file():
        return
    mode = ["--resume"] if (run / "run.json").is_file() else []
    run.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "summary.json", tdkd("distill", *options, "-o", str(run), "--json", *mode, capture=True))


def merge_and_eval(run: Path, data: Path, task: str) -> dict:
    merged = run.parent / f"{run.name}-merged"
    result = run / "eval-merged.json"
    if result.is_file():
        return json.loads(result.read_text())
    tdkd("merge", str(run / "best"), "-o", str(merged), "--force", "--json", capture=True)
    out = tdkd("eval", str(merged), "--data", str(data), "--task", task, "--json", capture=True)
    atomic_write_text(result, out)
    shutil.rmtree(merged, ignore_errors=True)  # remade by `tdkd merge RUN/best` when needed; keeps disk use bounded
    return json.loads(out)


def cmd_run(a) -> None:
    task, data = a.task, Path(a.glue) / TASK_DIRS[a.task]
    root = Path(a.out) / task
    root.mkdir(parents=True, exist_ok=True)
    troot = Path(a.teacher_root or a.out) / task
    teacher_run, teacher = troot / "teacher-run", troot / "teacher"
    distill(teacher_run, "--recipe", f"{task}-teacher", "--data", str(data))
    if not (teacher / "config.json").is_file():
        tdkd("merge", str(teacher_run / "best"), "-o", str(teacher), "--force", "--json", capture=True)
    if not (teacher_run / "eval-merged.json").is_file():
        out = tdkd("eval", str(teacher), "--data", str(data), "--task", task, "--json", capture=True)
        atomic_write_text(teacher_run / "eval-merged.json", out)
    for seed in a.seeds:
        for arm in a.arms:
            run = root / f"{arm}-s{seed}"
            models = ["--teacher", "none", "--student", str(teacher)] if arm == "a" else ["--teacher", str(teacher)]
            distill(run, "--recipe", f"{task}-{ARMS[arm]}", "--data", str(data), "--seed", str(seed), *models, *a.extra)
            merge_and_eval(run, data, task)


def _mean_std(xs):
    if not xs:
        return "-"
    m = statistics.mean(xs)
    if len(xs) == 1:
        return f"{100 * m:.2f} (1 seed)"
    return f"{100 * m:.2f} ± {100 * statistics.stdev(xs):.2f}"


def cmd_table(a) -> None:
    lines = []
    for task in a.tasks:
        root = Path(a.out) / task
        if not root.is_dir():
            continue
        troot = Path(a.teacher_root or a.out) / task
        t_eval = troot / "teacher-run" / "eval-merged.json"
        t_sum = troot / "teacher-run" / "summary.json"
        metric = "accuracy"
        lines.append(f"\n### {TASK_DIRS[task]} (dev {metric}, %)\n")
        if t_eval.is_file():
            te = json.loads(t_eval.read_text())
            ts = json.loads(t_sum.read_text())
            lines.append(f"Teacher (MiniLM-L6 fine-tuned, {ts['params_inference']:,} parameters): "
                         f"**{100 * te['metrics'][metric]:.2f}** on {te['examples']} dev examples, "
                         f"{ts['steps']} steps at {ts['seconds_per_step']:.3f} s/step.\n")
        lines.append("| arm | seeds | best-checkpoint dev acc. (mean ± sd) | per seed | = merged `tdkd eval` | "
                     "final-step dev acc. (mean ± sd) | params training | params inference | s/step (median of seeds) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for arm in a.arms:
            runs = sorted(root.glob(f"{arm}-s*[0-9]"))
            accs, match, s_step, p_train, p_inf, seeds, finals = [], True, [], None, None, [], []
            for run in runs:
                ev, sm = run / "eval-merged.json", run / "summary.json"
                if not (ev.is_file() and sm.is_file()):
                    continue
                e, s = json.loads(ev.read_text()), json.loads(sm.read_text())
                acc = e["metrics"][metric]
                accs.append(acc)
                seeds.append(run.name.split("-s")[-1])
                match &= math.isclose(acc, s["best"]["value"], abs_tol=1e-9)
                if s.get("seconds_per_step"):
                    s_step.append(s["seconds_per_step"])
                finals.append(s["final_metrics"][metric])
                p_train, p_inf = s["params_training"], s["params_inference"]
            if not accs:
                continue
            per = ", ".join(f"{100 * x:.2f}" for x in accs)
            lines.append(f"| {ARM_NAMES[arm]} | {','.join(seeds)} | {_mean_std(accs)} | {per} | {'yes' if match else 'NO'} | "
                         f"{_mean_std(finals)} | {p_train:,} | {p_inf:,} | {f'{statistics.median(s_step):.3f}' if s_step else '-'} |")
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    import torch

    lines.append(f"\nMachine of these figures: {cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
                 f"with {torch.get_num_threads()} threads, Python {platform.python_version()}.")
    print("\n".join(lines))


def _run_record(run: Path) -> dict | None:
    """Scores of one finished arm run: best (merged eval), final step, dev accuracy by step, recipe."""
    ev, sm = run / "eval-merged.json", run / "summary.json"
    if not (ev.is_file() and sm.is_file()):
        return None
    import yaml

    e, s = json.loads(ev.read_text()), json.loads(sm.read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    return {"best": e["metrics"]["accuracy"], "final": s["final_metrics"]["accuracy"],
            "evals": {r["step"]: r["eval"]["accuracy"] for r in rows},
            "recipe": yaml.safe_load((run / "recipe.yaml").read_text())}


def _runs(root: Path, arm: str) -> dict[str, dict]:
    out = {}
    for run in sorted(root.glob(f"{arm}-s*[0-9]")):
        rec = _run_record(run)
        if rec is not None:
            out[run.name.split("-s")[-1]] = rec
    return out


def _changes(recipe: dict, base: dict) -> str:
    """Recipe keys that differ from the main grid's run of the same arm and seed."""
    keys = sorted((set(recipe) | set(base)) - {"seed", "description"})
    diff = [f"{k}: {recipe.get(k)}" for k in keys if recipe.get(k) != base.get(k)]
    return ", ".join(diff) or "none"


def cmd_curves(a) -> None:
    """Mean dev accuracy over the seeds at given steps, per arm, for each --out directory."""
    print("| runs | arm | seeds | " + " | ".join(f"step {k}" for k in a.steps) + " |")
    print("|---|---|---|" + "---|" * len(a.steps))
    for out in a.outs:
        for arm in ARMS:
            curves = [rec["evals"] for rec in _runs(Path(out) / a.task, arm).values()]
            if curves:
                cells = [f"{100 * statistics.mean(c[k] for c in curves):.1f}" if all(k in c for c in curves) else "-"
                         for k in a.steps]
                print(f"| {out} | {arm} | {len(curves)} | " + " | ".join(cells) + " |")


def cmd_investigate(a) -> None:
    """Run the ATTEMPTS for a task (all, or --only NAMES), each as `run` with its options."""
    for name in a.only or list(ATTEMPTS):
        extra, arms, tasks = ATTEMPTS[name]
        if a.task not in tasks:
            continue
        cmd_run(argparse.Namespace(task=a.task, glue=a.glue, out=f"{a.base}-{name}", seeds=a.seeds, arms=list(arms),
                                   teacher_root=a.base, extra=extra))


def cmd_attempts(a) -> None:
    """One row per (variant directory, arm): scores next to the main grid's, and the paired
    per-seed difference (same seed = same data order and dropout) against arm --against."""
    base = Path(a.base) / a.task
    lines = [f"| attempt (changes vs main grid) | arm | seeds | best dev acc. (mean ± sd) | per seed | final-step (mean ± sd) | "
             f"dev acc. at first eval | best - ({a.against}) on the same seeds, with the same change where run (mean ± sd) |",
             "|---|---|---|---|---|---|---|---|"]

    main_runs = {arm: _runs(base, arm) for arm in ARMS}

    def row(label, arm, recs, own=None):
        seeds = sorted(recs)
        best = [recs[k]["best"] for k in seeds]
        ref = own or main_runs[a.against]
        paired = [recs[k]["best"] - ref[k]["best"] for k in seeds if k in ref]
        firsts = [min(recs[k]["evals"].items()) for k in seeds if recs[k]["evals"]]
        first = (f"{100 * statistics.mean(x[1] for x in firsts):.1f} (step {firsts[0][0]})" if firsts else "-")
        lines.append(f"| {label} | {arm} | {','.join(seeds)} | {_mean_std(best)} | {', '.join(f'{100 * x:.2f}' for x in best)} | "
                     f"{_mean_std([recs[k]['final'] for k in seeds])} | {first} | "
                     f"{_signed(paired) if paired else '-'} |")

    for arm, recs in main_runs.items():
        if recs:
            row(f"main grid ({a.base})", arm, recs)
    variants = a.variants or [f"{a.base}-{name}" for name, (_, _, tasks) in ATTEMPTS.items()
                              if a.task in tasks and (Path(f"{a.base}-{name}") / a.task).is_dir()]
    for v in variants:
        v_runs = {arm: _runs(Path(v) / a.task, arm) for arm in ARMS}
        for arm, recs in v_runs.items():
            if not recs:
                continue
            main = main_runs[arm]
            changes = {_changes(r["recipe"], main[k]["recipe"]) if k in main else "?" for k, r in recs.items()}
            row(f"{' / '.join(sorted(changes))} ({v})", arm, recs, v_runs[a.against])
    print("\n".join(lines))


def _signed(xs):
    m = 100 * statistics.mean(xs)
    sd = f" ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else " (1 seed)"
    return f"{m:+.2f}{sd}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--task", choices=list(TASK_DIRS), required=True)
    r.add_argument("--glue", default="../shared/data/glue")
    r.add_argument("--out", default="runs/exp")
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    r.add_argument("--teacher-root", default=None, help="reuse the teachers under this --out of an earlier run")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further tdkd distill options for the arms")
    t = sub.add_parser("table")
    t.add_argument("--out", default="runs/exp")
    t.add_argument("--tasks", nargs="+", default=list(TASK_DIRS))
    t.add_argument("--arms", nargs="+", default=list(ARMS))
    t.add_argument("--teacher-root", default=None)
    v = sub.add_parser("attempts")
    v.add_argument("--task", choices=list(TASK_DIRS), required=True)
    v.add_argument("--base", default="runs/exp", help="--out of the main grid")
    v.add_argument("--variants", nargs="+", default=[], help="--out directories of variant runs (default: the ATTEMPTS run so far)")
    v.add_argument("--against", default="b", choices=list(ARMS), help="arm of the main grid to pair with")
    i = sub.add_parser("investigate")
    i.add_argument("--task", choices=list(TASK_DIRS), required=True)
    i.add_argument("--glue", default="../shared/data/glue")
    i.add_argument("--base", default="runs/exp", help="--out of the main grid (teachers); attempts go to BASE-NAME")
    i.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    i.add_argument("--only", nargs="+", choices=list(ATTEMPTS), help="run only these attempts")
    c = sub.add_parser("curves")
    c.add_argument("--task", choices=list(TASK_DIRS), required=True)
    c.add_argument("--outs", nargs="+", default=["runs/exp"])
    c.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 150, 200, 250])
    a = ap.parse_args()
    {"run": cmd_run, "table": cmd_table, "attempts": cmd_attempts, "investigate": cmd_investigate,
     "curves": cmd_curves}[a.cmd](a)


if __name__ == "__main__":
    main()

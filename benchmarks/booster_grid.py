"""Does over-parameterization boost each kind of distillation? The per-method grid of docs/results.md.

    python benchmarks/booster_grid.py run --suite sst2-cut            # every method, resumable
    python benchmarks/booster_grid.py run --suite sst2-cut --methods kd theseus
    python benchmarks/booster_grid.py table --suite sst2-cut          # markdown tables
    python benchmarks/booster_grid.py figures --suite sst2-cut -o docs/figures/sst2-cut   # tdkd report

For every method (logit KD, a feature-, a relation-based one, DML, Theseus) and arm (dense; MPO with
lambda = 0; OPDF: MPO + tensor constraint) of a suite:
1. tuning: each learning-rate setting of the arm (GRID; for MPO arms the cores' learning rate) is
   trained with the tuning seed and scored on a slice held out from the training file (never the dev
   set): the run's best checkpoint on that slice;
2. the setting with the best held-out score is trained again with the other seeds (same data, steps
   and batch size for every arm; seeds change data order, dropout and fresh initialisations);
3. each of the chosen setting's runs: best checkpoint (chosen on the held-out slice) merged with
   `tdkd merge`, scored on the dev set with `tdkd eval`, and on the held-out slice again, which must
   equal the score the run recorded.
DML and ONE train without a teacher, so they have no OPDF arm (the tensor constraint aligns the
student's cores with a teacher's). Everything lands under --out/SUITE/METHOD-ARM-SETTING-sSEED;
finished steps are skipped and unfinished runs resumed, so the command can be rerun after an
interruption. The teacher comes from opdf_experiments.py (`run --task sst2`), trained there if missing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opdf_experiments import cmd_run as train_teachers  # noqa: E402
from opdf_experiments import distill, tdkd  # noqa: E402

ARMS = {"dense": ["--no-mpo", "--tensor-lambda", "0"],
        "mpo": ["--mpo", "--tensor-lambda", "0"],
        "opdf": ["--mpo", "--tensor-lambda", "100"]}
ARM_NAMES = {"dense": "dense", "mpo": "MPO, lambda=0", "opdf": "OPDF (MPO + constraint)"}
# Learning-rate settings tried per arm: dense students a higher rate (does a tuned dense student match
# the MPO students' early speed-up?), MPO students a lower rate on the cores (docs/results.md: 5x lower
# matched KD on SST-2).
GRID = {"dense": {"lr1e-4": ["--lr", "1e-4"], "lr2e-4": ["--lr", "2e-4"]},
        "mpo": {"core1e-4": ["--lr", "1e-4", "--mpo-lr", "1e-4"], "core2e-5": ["--lr", "1e-4", "--mpo-lr", "2e-5"]}}
GRID["opdf"] = GRID["mpo"]
TUNE_SEED = 1


def sst2_methods(teacher: Path) -> dict[str, tuple[str, list[str], tuple[str, ...]]]:
    """name -> (description, tdkd distill options, arms) for students of the fine-tuned MiniLM-L6."""
    layers = "bert.encoder.layer.*.attention.self"
    cut = ["--student-layers", "first-3"]  # Theseus cuts its successor itself (teacher layers 0, 2, 4)
    return {
        "kd": ("logit KD (alpha=1, T=1)", cut, tuple(ARMS)),
        "feature": ("MiniLM self-attention relations (weight 1) + logit KD",
                    [*cut, "--method", f"minilm:weight=1,student={layers},teacher={layers}"], tuple(ARMS)),
        "relation": ("correlation congruence on the pooler (weight 10) + logit KD",
                     [*cut, "--method", "cc:weight=10,student=bert.pooler,teacher=bert.pooler"], tuple(ARMS)),
        "theseus": ("Theseus module replacement, groups of 2 (base 0.3, rate 0.008), CE only",
                    ["--alpha", "0", "--method", "theseus:group=2,base=0.3,rate=0.008"],
                    tuple(ARMS)),
        "dml": ("DML, 2 peers (best peer on the held-out slice), no teacher",
                ["--teacher", "none", "--student", str(teacher), *cut, "--method", "dml:peers=2,temperature=1"],
                ("dense", "mpo")),
    }


class Suite:
    """Data, teacher and methods of one suite (SST-2, students cut from the fine-tuned teacher)."""

    def __init__(self, a):
        self.name, self.root = a.suite, Path(a.out) / a.suite
        self.glue = Path(a.glue)
        self.teacher = Path(a.out) / "teacher" / "sst2" / "teacher"
        self.data = self.root / "data"
        self.methods = sst2_methods(self.teacher)

    def base(self) -> list[str]:
        """What every run shares: one epoch over the first 4,000 sentences (125 steps of 32), max length 64,
        AdamW with 10% warm-up then linear decay, n = 5 cores, evaluation every 25 steps."""
        return ["--teacher", str(self.teacher), "--task", "sst2", "--train-limit", "4000", "--max-length", "64",
                "--batch-size", "32", "--epochs", "1", "--warmup-ratio", "0.1", "--mpo-n", "5", "--alpha", "1",
                "--temperature", "1", "--eval-every", "25", "--save-every", "125", "--keep-last", "1"]

    def prepare(self, a) -> None:
        """The teacher (opdf_experiments) and a data directory whose 'heldout' split is the last
        1,000 sentences of SST-2's training file (training reads the first 4,000)."""
        if not (self.teacher / "config.json").is_file():
            train_teachers(argparse.Namespace(task="sst2", glue=a.glue, out=str(Path(a.out) / "teacher"),
                                              seeds=[], arms=[], teacher_root=None, extra=[]))
        heldout = self.data / "heldout.tsv"
        if heldout.is_file():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        lines = (self.glue / "SST-2" / "train.tsv").read_text().splitlines(keepends=True)
        (self.data / "train.tsv").write_text("".join(lines))
        (self.data / "dev.tsv").write_text((self.glue / "SST-2" / "dev.tsv").read_text())
        tmp = heldout.with_suffix(".tmp")
        tmp.write_text("".join([lines[0], *lines[-1000:]]))
        tmp.rename(heldout)


def run_name(method: str, arm: str, setting: str, seed: int) -> str:
    return f"{method}-{arm}-{setting}-s{seed}"


def train(s: Suite, method: str, arm: str, setting: str, seed: int) -> dict:
    _, options, _ = s.methods[method]
    run = s.root / run_name(method, arm, setting, seed)
    opts = list(options)
    if method == "dml":  # the peers' MPO form is part of the method's spec
        opts[-1] = opts[-1].replace("dml:", f"dml:mpo={'0+0' if arm == 'dense' else '1+1'},")
    distill(run, *s.base(), "--data", str(s.data), "--dev-split", "heldout", "--seed", str(seed),
            *opts, *ARMS[arm], *GRID[arm][setting])
    return json.loads((run / "summary.json").read_text())


def score(s: Suite, run: Path) -> dict:
    """The best checkpoint merged, scored on the dev set and on the held-out slice (cached)."""
    out = run / "scores.json"
    if out.is_file():
        return json.loads(out.read_text())
    merged = run.parent / f"{run.name}-merged"
    tdkd("merge", str(run / "best"), "-o", str(merged), "--force", "--json", capture=True)
    res = {}
    for split in ("dev", "heldout"):
        ev = json.loads(tdkd("eval", str(merged), "--data", str(s.data), "--task", "sst2", "--split", split,
                             "--max-length", "64",
                             "--json", capture=True))
        res[split] = ev["metrics"]["accuracy"]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.rename(out)
    return res


def chosen_setting(s: Suite, method: str, arm: str) -> str | None:
    """The grid setting whose tuning run scored best on the held-out slice (None until all ran)."""
    held = {}
    for setting in GRID[arm]:
        sm = s.root / run_name(method, arm, setting, TUNE_SEED) / "summary.json"
        if not sm.is_file():
            return None
        held[setting] = json.loads(sm.read_text())["best"]["value"]
    return max(held, key=lambda k: (held[k], -list(GRID[arm]).index(k)))


def cmd_run(a) -> None:
    s = Suite(a)
    s.prepare(a)
    for method in a.methods or list(s.methods):
        arms = s.methods[method][2]
        for arm in arms:
            for setting in GRID[arm]:
                train(s, method, arm, setting, TUNE_SEED)
        for arm in arms:
            setting = chosen_setting(s, method, arm)
            for seed in a.seeds:
                train(s, method, arm, setting, seed)
                score(s, s.root / run_name(method, arm, setting, seed))


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _ci(diffs: list[float]) -> str:
    """Mean of paired differences (points) with its 95% t interval and the verdict it supports."""
    if len(diffs) < 2:
        return f"{100 * diffs[0]:+.2f} (1 seed)" if diffs else "-", "-"
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = T975[len(diffs) - 1] * sd / math.sqrt(len(diffs))
    verdict = "positive" if m - half > 0 else "negative" if m + half < 0 else "not distinguishable from 0"
    return f"{100 * m:+.2f} [{100 * (m - half):+.2f}, {100 * (m + half):+.2f}]", verdict


def _ms(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else (
        f"{100 * xs[0]:.2f}" if xs else "-")


def arm_record(s: Suite, method: str, arm: str, seeds: list[int]) -> dict | None:
    setting = chosen_setting(s, method, arm)
    if setting is None:
        return None
    rec = {"setting": setting, "tuning": {}, "dev": {}, "match": True, "s_step": [], "params": None}
    for st in GRID[arm]:
        sm = json.loads((s.root / run_name(method, arm, st, TUNE_SEED) / "summary.json").read_text())
        rec["tuning"][st] = sm["best"]["value"]
    for seed in seeds:
        run = s.root / run_name(method, arm, setting, seed)
        if not (run / "scores.json").is_file():
            continue
        sc, sm = json.loads((run / "scores.json").read_text()), json.loads((run / "summary.json").read_text())
        rec["dev"][seed] = sc["dev"]
        rec["match"] &= math.isclose(sc["heldout"], sm["best"]["value"], abs_tol=1e-9)
        rec["s_step"].append(sm["seconds_per_step"])
        rec["params"] = (sm["params_training"], sm["params_inference"])
    return rec


def cmd_table(a) -> None:
    s = Suite(a)
    lines = [f"Teacher: {s.teacher}; runs under {s.root}. Held-out slice: the last 1,000 sentences of the "
             f"training file; tuning seed {TUNE_SEED}; dev = GLUE SST-2 dev (872).\n"]
    verdicts = []
    for method, (desc, _, arms) in s.methods.items():
        recs = {arm: arm_record(s, method, arm, a.seeds) for arm in arms}
        if not any(recs.values()):
            continue
        lines += [f"\n#### {method}: {desc}\n",
                  "| arm | settings tried: held-out acc. (seed 1) | chosen | seeds | dev acc. (mean ± sd) | per seed | "
                  "- dense, paired, 95% CI (points) | = merged `tdkd eval` | s/step (median) | params training / inference |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        dense = recs.get("dense")
        for arm, rec in recs.items():
            if rec is None:
                lines.append(f"| {ARM_NAMES[arm]} | (not run) | | | | | | | | |")
                continue
            tried = ", ".join(f"{k}: {100 * v:.2f}" for k, v in rec["tuning"].items())
            seeds = sorted(rec["dev"])
            devs = [rec["dev"][k] for k in seeds]
            ci, verdict = ("", "")
            if arm != "dense" and dense:
                paired = [rec["dev"][k] - dense["dev"][k] for k in seeds if k in dense["dev"]]
                ci, verdict = _ci(paired)
                verdicts.append(f"- {method}, {ARM_NAMES[arm]} - dense: {ci} points over {len(paired)} seeds: {verdict}")
            params = f"{rec['params'][0]:,} / {rec['params'][1]:,}" if rec["params"] else "-"
            lines.append(f"| {ARM_NAMES[arm]} | {tried} | {rec['setting']} | {','.join(map(str, seeds))} | {_ms(devs)} | "
                         f"{', '.join(f'{100 * x:.2f}' for x in devs)} | {ci} | {'yes' if rec['match'] else 'NO'} | "
                         f"{statistics.median(rec['s_step']):.3f} | {params} |" if devs else
                         f"| {ARM_NAMES[arm]} | {tried} | {rec['setting']} | (seeds not run) | | | | | | |")
    print("\n".join(lines + ["\n#### Verdicts (paired per seed, t interval)\n"] + verdicts))


def cmd_figures(a) -> None:
    """`tdkd report` of each method's chosen runs (every arm, seeds as mean and band)."""
    s = Suite(a)
    for method, (_, _, arms) in s.methods.items():
        runs = []
        for arm in arms:
            setting = chosen_setting(s, method, arm)
            if setting:
                runs += [s.root / run_name(method, arm, setting, k) for k in a.seeds
                         if (s.root / run_name(method, arm, setting, k) / "scores.json").is_file()]
        if runs:
            tdkd("report", *map(str, runs), "-o", str(Path(a.output) / method), "--force", "--json", capture=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "table", "figures"):
        p = sub.add_parser(name)
        p.add_argument("--suite", default="sst2-cut", choices=["sst2-cut"])
        p.add_argument("--out", default="runs/grid")
        p.add_argument("--glue", default="../shared/data/glue")
        p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
        if name == "run":
            p.add_argument("--methods", nargs="+", default=None)
        if name == "figures":
            p.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    {"run": cmd_run, "table": cmd_table, "figures": cmd_figures}[a.cmd](a)


if __name__ == "__main__":
    main()

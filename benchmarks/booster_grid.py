"""Does over-parameterization boost each kind of distillation? The per-method grid of docs/results.md.

    python benchmarks/booster_grid.py run --suite sst2-cut            # every method, resumable
    python benchmarks/booster_grid.py run --suite sst2-cut --methods kd theseus
    python benchmarks/booster_grid.py table --suite sst2-cut          # markdown tables
    python benchmarks/booster_grid.py figures --suite sst2-cut -o docs/figures/sst2-cut   # tdkd report

For every method (logit KD, a feature-, a relation-based one, DML, Theseus; ONE on digits) and arm
(dense; MPO with lambda = 0; OPDF: MPO + tensor constraint) of a suite (sst2-cut, sst2-narrow,
sst2-narrow-long, digits-cnn; see the Suite classes):
1. tuning: each learning-rate setting of the arm (Suite.grid; for MPO arms the cores' learning rate) is
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
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opdf_experiments import cmd_run as train_teachers  # noqa: E402
from opdf_experiments import distill, tdkd  # noqa: E402
from tdkd_cli.io.checkpoint import atomic_write_text  # noqa: E402  (on the path via opdf_experiments)

ARM_NAMES = {"dense": "dense", "mpo": "MPO, lambda=0", "opdf": "OPDF (MPO + constraint)"}
TUNE_SEED = 1


class Suite:
    """One task: its data (with a 'heldout' split cut from the training data), teacher, the options
    every run shares, the methods, the OPDF lambda and the learning-rate settings tried per arm."""

    name = ""
    lam = "100"
    eval_options: list[str] = []

    def __init__(self, a):
        self.root, self.teachers, self.glue = Path(a.out) / self.name, Path(a.out) / "teacher", Path(a.glue)
        self.data = self.root / "data"

    def arm_options(self, arm: str) -> list[str]:
        return {"dense": ["--no-mpo", "--tensor-lambda", "0"], "mpo": ["--mpo", "--tensor-lambda", "0"],
                "opdf": ["--mpo", "--tensor-lambda", self.lam]}[arm]

    def grid(self, arm: str) -> dict[str, list[str]]:
        """Dense students try a higher rate (does a tuned dense student match the MPO students' early
        speed-up?), MPO students a lower rate on the cores (docs/results.md: 5x lower matched KD)."""
        lr, hi, lo = self.lr
        if arm == "dense":
            return {f"lr{lr}": ["--lr", lr], f"lr{hi}": ["--lr", hi]}
        return {f"core{lr}": ["--lr", lr, "--mpo-lr", lr], f"core{lo}": ["--lr", lr, "--mpo-lr", lo]}


class SST2Cut(Suite):
    """SST-2, 3-layer students cut from the fine-tuned MiniLM-L6 (its layers 0-2)."""

    name, lr = "sst2-cut", ("1e-4", "2e-4", "2e-5")
    eval_options = ["--task", "sst2", "--max-length", "64"]

    def __init__(self, a):
        super().__init__(a)
        self.teacher = self.teachers / "sst2" / "teacher"
        layers, cut = "bert.encoder.layer.*.attention.self", ["--student-layers", "first-3"]
        # name -> (description, tdkd distill options, arms); Theseus cuts its successor itself (layers 0, 2, 4)
        self.methods = {
            "kd": ("logit KD (alpha=1, T=1)", cut, ("dense", "mpo", "opdf")),
            "feature": ("MiniLM self-attention relations (weight 1) + logit KD",
                        [*cut, "--method", f"minilm:weight=1,student={layers},teacher={layers}"], ("dense", "mpo", "opdf")),
            "relation": ("correlation congruence on the pooler (weight 10) + logit KD",
                         [*cut, "--method", "cc:weight=10,student=bert.pooler,teacher=bert.pooler"], ("dense", "mpo", "opdf")),
            "theseus": ("Theseus module replacement, groups of 2 (base 0.3, rate 0.008), CE only",
                        ["--alpha", "0", "--method", "theseus:group=2,base=0.3,rate=0.008"], ("dense", "mpo", "opdf")),
            "dml": ("DML, 2 peers cut like the others (best peer on the held-out slice), no teacher",
                    ["--teacher", "none", "--student", str(self.teacher), *cut, "--method", "dml:peers=2,temperature=1"],
                    ("dense", "mpo")),
        }

    def base(self) -> list[str]:
        """One epoch over the first 4,000 sentences (125 steps of 32), max length 64, AdamW with 10%
        warm-up then linear decay, n = 5 cores, evaluation on the held-out slice every 25 steps."""
        return ["--teacher", str(self.teacher), "--task", "sst2", "--train-limit", "4000", "--max-length", "64",
                "--batch-size", "32", "--epochs", "1", "--warmup-ratio", "0.1", "--mpo-n", "5", "--alpha", "1",
                "--temperature", "1", "--eval-every", "25", "--save-every", "125", "--keep-last", "1"]

    def prepare(self, a) -> None:
        """The teacher (opdf_experiments) and a data directory whose 'heldout' split is the last
        1,000 sentences of SST-2's training file (training reads the first 4,000)."""
        if not (self.teacher / "config.json").is_file():
            train_teachers(argparse.Namespace(task="sst2", glue=a.glue, out=str(self.teachers),
                                              seeds=[], arms=[], teacher_root=None, extra=[]))
        if (self.data / "heldout.tsv").is_file():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        lines = (self.glue / "SST-2" / "train.tsv").read_text().splitlines(keepends=True)
        (self.data / "train.tsv").write_text("".join(lines))
        (self.data / "dev.tsv").write_text((self.glue / "SST-2" / "dev.tsv").read_text())
        atomic_write_text(self.data / "heldout.tsv", "".join([lines[0], *lines[-1000:]]))


class SST2Narrow(SST2Cut):
    """SST-2 with a narrower student that does not start from the teacher: TinyBERT's layout (4 layers of
    width 312, FFN 1,200, 12 heads) from random weights (its general-distillation weights are not available
    offline), sharing the MiniLM teacher's WordPiece vocabulary. Theseus needs equal widths, so it is left out."""

    name, lr = "sst2-narrow", ("5e-4", "1e-3", "1e-4")

    def __init__(self, a):
        super().__init__(a)
        layers, student = "bert.encoder.layer.*.attention.self", ["--student", "tinybert", "--init", "random"]
        self.methods = {
            "kd": ("logit KD (alpha=1, T=1)", student, ("dense", "mpo", "opdf")),
            "feature": ("MiniLM self-attention relations (weight 1) + logit KD",
                        [*student, "--method", f"minilm:weight=1,student={layers},teacher={layers}"],
                        ("dense", "mpo", "opdf")),
            "relation": ("correlation congruence on the pooler (weight 1) + logit KD",
                         [*student, "--method", "cc:weight=1,student=bert.pooler,teacher=bert.pooler"],
                         ("dense", "mpo", "opdf")),
            "dml": ("DML, 2 random-init peers (best peer on the held-out slice), no teacher",
                    ["--teacher", "none", *student, "--method", "dml:peers=2,temperature=1"], ("dense", "mpo")),
        }


class SST2NarrowLong(SST2Narrow):
    """The narrow SST-2 student of sst2-narrow with logit KD only, trained twice as long (two epochs over the
    same 4,000 sentences, 250 steps): does the MPO form still lag once the random-init students have time
    to leave the majority class?"""

    name = "sst2-narrow-long"

    def __init__(self, a):
        super().__init__(a)
        self.methods = {"kd": self.methods["kd"]}

    def base(self) -> list[str]:
        """sst2-narrow's options with 2 epochs (250 steps)."""
        opts = super().base()
        for flag, value in (("--epochs", "2"), ("--save-every", "250")):
            opts[opts.index(flag) + 1] = value
        return opts


class DigitsCNN(Suite):
    """Handwritten digits (scikit-learn's 1,797 8x8 scans as images): a ResNet teacher (channels 32..256,
    2 blocks a stage) trained from scratch, and a 4x narrower ResNet student (1 block a stage) that
    starts from random weights."""

    name, lr, lam = "digits-cnn", ("2e-3", "4e-3", "5e-4"), "1e-3"

    def __init__(self, a):
        super().__init__(a)
        self.teacher = self.teachers / "digits" / "teacher"
        student = ["--student", "resnet-digits-small", "--init", "random"]
        self.methods = {
            "kd": ("logit KD (alpha=0.5, T=4)", student, ("dense", "mpo", "opdf")),
            "feature": ("attention transfer on the 4 stages (weight 1000) + logit KD",
                        [*student, "--method", "at:weight=1000,student=layer*,teacher=layer*"], ("dense", "mpo", "opdf")),
            "relation": ("relational KD on the pooled features (weight 1) + logit KD",
                         [*student, "--method", "rkd:weight=1,student=global_pool,teacher=global_pool"],
                         ("dense", "mpo", "opdf")),
            "dml": ("DML, 2 peers (best peer on the held-out slice), no teacher",
                    ["--teacher", "none", *student, "--method", "dml:peers=2,temperature=1"], ("dense", "mpo")),
            "one": ("ONE, 3 branches of the last stage and head (best branch on the held-out slice), no teacher",
                    ["--teacher", "none", *student, "--method", "one:branches=3,layers=1,temperature=3"],
                    ("dense", "mpo")),
        }

    def base(self) -> list[str]:
        """10 epochs at batch 64 (about 180 steps), AdamW (weight decay 0.05) with 10% warm-up then
        linear decay, n = 5 cores, evaluation on the held-out images every 30 steps."""
        return ["--teacher", str(self.teacher), "--batch-size", "64", "--epochs", "10", "--warmup-ratio", "0.1",
                "--weight-decay", "0.05", "--mpo-n", "5", "--alpha", "0.5", "--temperature", "4", "--eval-every", "30",
                "--save-every", "1000", "--keep-last", "1"]

    def prepare(self, a) -> None:
        """The teacher (recipe digits-cnn-teacher) and an image folder whose 'heldout' split is every
        fifth training image of each class (links; training reads the other four fifths)."""
        from tdkd_cli.io.data import digits_folder

        if not (self.data / "heldout").is_dir():
            source = digits_folder(self.root / "source")
            tmp = self.data.with_name("data.tmp")
            for split in ("train", "dev"):
                for cls in sorted(p for p in (source / split).iterdir() if p.is_dir()):
                    for i, img in enumerate(sorted(cls.iterdir())):
                        into = "heldout" if split == "train" and i % 5 == 0 else split
                        (tmp / into / cls.name).mkdir(parents=True, exist_ok=True)
                        (tmp / into / cls.name / img.name).symlink_to(img.resolve())
            tmp.rename(self.data)
        run = self.teachers / "digits" / "teacher-run"
        distill(run, "--recipe", "digits-cnn-teacher", "--data", str(self.data), "--dev-split", "heldout")
        if not (self.teacher / "config.json").is_file():
            tdkd("merge", str(run / "best"), "-o", str(self.teacher), "--force", "--json", capture=True)
        if not (run / "eval-merged.json").is_file():
            out = tdkd("eval", str(self.teacher), "--data", str(self.data), "--json", capture=True)
            atomic_write_text(run / "eval-merged.json", out)


SUITES = {s.name: s for s in (SST2Cut, SST2Narrow, SST2NarrowLong, DigitsCNN)}


def run_name(method: str, arm: str, setting: str, seed: int) -> str:
    return f"{method}-{arm}-{setting}-s{seed}"


def train(s: Suite, method: str, arm: str, setting: str, seed: int) -> None:
    _, options, _ = s.methods[method]
    run = s.root / run_name(method, arm, setting, seed)
    opts = list(options)
    if method == "dml":  # the peers' MPO form is part of the method's spec
        opts[-1] = opts[-1].replace("dml:", f"dml:mpo={'0+0' if arm == 'dense' else '1+1'},")
    distill(run, *s.base(), "--data", str(s.data), "--dev-split", "heldout", "--seed", str(seed),
            *opts, *s.arm_options(arm), *s.grid(arm)[setting], "--keep-best-only")  # an arm needs only best/


def score(s: Suite, run: Path) -> dict:
    """The best checkpoint merged, scored on the dev set and on the held-out slice (cached)."""
    out = run / "scores.json"
    if out.is_file():
        return json.loads(out.read_text())
    merged = run.parent / f"{run.name}-merged"
    tdkd("merge", str(run / "best"), "-o", str(merged), "--force", "--json", capture=True)
    metric = json.loads((run / "summary.json").read_text())["best"]["metric"]
    res = {}
    for split in ("dev", "heldout"):
        ev = json.loads(tdkd("eval", str(merged), "--data", str(s.data), *s.eval_options, "--split", split,
                             "--json", capture=True))
        res[split] = ev["metrics"][metric]
    atomic_write_text(out, json.dumps(res))
    shutil.rmtree(merged, ignore_errors=True)  # remade by `tdkd merge RUN/best` when needed; keeps the grid's disk bounded
    return res


def tuning_scores(s: Suite, method: str, arm: str) -> dict[str, float] | None:
    """Held-out score of each grid setting's tuning run (None until all ran)."""
    held = {}
    for setting in s.grid(arm):
        sm = s.root / run_name(method, arm, setting, TUNE_SEED) / "summary.json"
        if not sm.is_file():
            return None
        held[setting] = json.loads(sm.read_text())["best"]["value"]
    return held


def _best(held: dict[str, float]) -> str:
    """The setting with the best held-out score (ties: the first listed)."""
    return max(held, key=lambda k: (held[k], -list(held).index(k)))


def chosen_setting(s: Suite, method: str, arm: str) -> str | None:
    held = tuning_scores(s, method, arm)
    return _best(held) if held else None


def cmd_run(a) -> None:
    s = SUITES[a.suite](a)
    s.prepare(a)
    for method in a.methods or list(s.methods):
        arms = s.methods[method][2]
        for arm in arms:
            for setting in s.grid(arm):
                train(s, method, arm, setting, TUNE_SEED)
        for arm in arms:
            setting = chosen_setting(s, method, arm)
            for seed in a.seeds:
                train(s, method, arm, setting, seed)
                score(s, s.root / run_name(method, arm, setting, seed))


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _ci(diffs: list[float]) -> tuple[str, str]:
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
    held = tuning_scores(s, method, arm)
    if held is None:
        return None
    setting = _best(held)
    rec = {"setting": setting, "tuning": held, "dev": {}, "match": True, "s_step": [], "params": None}
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
    s = SUITES[a.suite](a)
    lines = [f"{type(s).__doc__}\nRuns under {s.root}; tuning seed {TUNE_SEED}; OPDF lambda {s.lam}.\n"]
    t_eval = s.teacher.parent / "teacher-run" / "eval-merged.json"
    if t_eval.is_file():
        t = json.loads(t_eval.read_text())
        lines.append(f"Teacher: {100 * next(iter(t['metrics'].values())):.2f} on {t['examples']} dev examples.\n")
    verdicts = []
    for method, (desc, _, arms) in s.methods.items():
        recs = {arm: arm_record(s, method, arm, a.seeds) for arm in arms}
        if not any(recs.values()):
            continue
        lines += [f"\n#### {method}: {desc}\n",
                  "| arm | settings tried: held-out acc. (seed 1) | chosen | seeds | dev acc. (mean ± sd) | per seed | "
                  "arm - dense, paired per seed: mean [95% CI] (points) | = merged `tdkd eval` | s/step (median) | params training / inference |",
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
                if paired:
                    verdicts.append(f"- {method}, {ARM_NAMES[arm]} - dense: {ci} points over {len(paired)} seeds: {verdict}")
            params = f"{rec['params'][0]:,} / {rec['params'][1]:,}" if rec["params"] else "-"
            lines.append(f"| {ARM_NAMES[arm]} | {tried} | {rec['setting']} | {','.join(map(str, seeds))} | {_ms(devs)} | "
                         f"{', '.join(f'{100 * x:.2f}' for x in devs)} | {ci} | {'yes' if rec['match'] else 'NO'} | "
                         f"{statistics.median(rec['s_step']):.3f} | {params} |" if devs else
                         f"| {ARM_NAMES[arm]} | {tried} | {rec['setting']} | (seeds not run) | | | | | | |")
    print("\n".join(lines + ["\n#### Verdicts (paired per seed, t interval)\n"] + verdicts))


def cmd_figures(a) -> None:
    """`tdkd report` of each method's chosen runs (every arm, seeds as mean and band) under
    --out/reports/SUITE/METHOD; its held-out-by-step figure is copied to -o as METHOD.png."""
    s = SUITES[a.suite](a)
    Path(a.output).mkdir(parents=True, exist_ok=True)
    for method, (_, _, arms) in s.methods.items():
        runs = []
        for arm in arms:
            setting = chosen_setting(s, method, arm)
            if setting:
                runs += [s.root / run_name(method, arm, setting, k) for k in a.seeds
                         if (s.root / run_name(method, arm, setting, k) / "scores.json").is_file()]
        if runs:
            report = Path(a.out) / "reports" / s.name / method
            report.parent.mkdir(parents=True, exist_ok=True)
            tdkd("report", *map(str, runs), "-o", str(report), "--force", "--json", capture=True)
            shutil.copyfile(report / "dev.png", Path(a.output) / f"{method}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "table", "figures"):
        p = sub.add_parser(name)
        p.add_argument("--suite", default="sst2-cut", choices=list(SUITES))
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

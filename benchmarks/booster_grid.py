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
from opdf_experiments import distill, tdkd  # noqa: E402
from grid_suites import ARM_NAMES, SUITES, TUNE_SEED, Suite  # noqa: E402
from tdkd_cli.io.checkpoint import atomic_write_text  # noqa: E402  (on the path via opdf_experiments)

def run_name(method: str, arm: str, setting: str, seed: int) -> str:
    return f"{method}-{arm}-{setting}-s{seed}"


def train(s: Suite, method: str, arm: str, setting: str, seed: int) -> None:
    _, options, _ = s.methods[method]
    run = s.root / run_name(method, arm, setting, seed)
    opts = list(options)
    if method == "dml":  # the peers' MPO form is part of the method's spec
        opts[-1] = opts[-1].replace("dml:", f"dml:mpo={'0+0' if arm == 'dense' else '1+1'},")
    distill(run, *s.base(), *s.data_options(), "--seed", str(seed),
            *opts, *s.arm_options(arm), *s.grid(arm)[setting], "--keep-best-only")  # an arm needs only best/


def score(s: Suite, run: Path) -> dict:
    """The best checkpoint merged, scored on the dev set and on the held-out slice (cached)."""
    out = run / "scores.json"
    if out.is_file():
        return json.loads(out.read_text())
    merged = run.parent / f"{run.name}-merged"
    tdkd("merge", str(run / "best"), "-o", str(merged), "--force", "--json", capture=True)
    res = s.scores(merged, json.loads((run / "summary.json").read_text())["best"]["metric"])
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


def paired_stats(diffs: list[float]) -> dict | None:
    """Paired differences (fractions): mean, sd, the 95% t interval, the two-sided p of a paired t test
    and the minimum detectable effect: the smallest true mean difference this many pairs with this
    spread detect with 80% power at the 5% level, (t_0.975 + t_0.80, n-1 degrees of freedom) x sd / sqrt(n)
    (the usual normal-approximation formula with t quantiles; it assumes the measured sd is the true one)."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return None
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    t975, t80 = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.80, n - 1)
    p = 1.0 if se == 0 and m == 0 else (0.0 if se == 0 else float(2 * stats.t.sf(abs(m / se), n - 1)))
    return {"n": n, "mean": m, "sd": sd, "lo": float(m - t975 * se), "hi": float(m + t975 * se), "p": p,
            "mde": float((t975 + t80) * se)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: the i-th smallest p times (m - i + 1),
    made monotone, capped at 1. A comparison is significant at family-wise level 5% when its adjusted
    p is below 0.05."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _ms(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else (
        f"{100 * xs[0]:.2f}" if xs else "-")


def arm_record(s: Suite, method: str, arm: str, seeds: list[int]) -> dict | None:
    held = tuning_scores(s, method, arm)
    if held is None:
        return None
    setting = _best(held)
    rec = {"setting": setting, "tuning": held, "dev": {}, "match": True, "s_step": [], "train_s": [], "params": None}
    for seed in seeds:
        run = s.root / run_name(method, arm, setting, seed)
        if not (run / "scores.json").is_file():
            continue
        sc, sm = json.loads((run / "scores.json").read_text()), json.loads((run / "summary.json").read_text())
        rec["dev"][seed] = sc["dev"]
        rec["match"] &= math.isclose(sc["heldout"], sm["best"]["value"], abs_tol=1e-9)
        rec["s_step"].append(sm["seconds_per_step"])
        rec["train_s"].append(sm["train_seconds"])
        rec["params"] = (sm["params_training"], sm["params_inference"])
    return rec


def _paired(rec: dict, base: dict) -> list[float]:
    """Score differences rec - base over the seeds both ran, in seed order."""
    return [rec["dev"][k] - base["dev"][k] for k in sorted(rec["dev"]) if k in base["dev"]]


def comparisons(s: Suite, seeds: list[int]) -> list[dict]:
    """Every arm against the same method's dense arm, paired per seed (the family the summary corrects)."""
    out = []
    for method, (_, _, arms) in s.methods.items():
        dense = arm_record(s, method, "dense", seeds)
        for arm in arms:
            rec = arm_record(s, method, arm, seeds) if arm != "dense" else None
            if rec is None or dense is None:
                continue
            st = paired_stats(_paired(rec, dense))
            if st:
                out.append({"suite": s.name, "method": method, "arm": arm, **st,
                            "time_x": statistics.median(rec["train_s"]) / statistics.median(dense["train_s"])})
    return out


def _arm_row(arm: str, rec: dict | None, dense: dict | None) -> str:
    if rec is None:
        return f"| {ARM_NAMES[arm]} | (not run) | | | | | | | | | |"
    tried = ", ".join(f"{k}: {100 * v:.2f}" for k, v in rec["tuning"].items())
    seeds = sorted(rec["dev"])
    devs = [rec["dev"][k] for k in seeds]
    if not devs:
        return f"| {ARM_NAMES[arm]} | {tried} | {rec['setting']} | (seeds not run) | | | | | | | |"
    ci, mde = "", ""
    if arm != "dense" and dense:
        paired = _paired(rec, dense)
        st = paired_stats(paired)
        ci = _ci_text(st) if st else (f"{100 * paired[0]:+.2f} (1 seed)" if paired else "-")
        mde = f"{100 * st['mde']:.2f}" if st else ""
    params = f"{rec['params'][0]:,} / {rec['params'][1]:,}" if rec["params"] else "-"
    return (f"| {ARM_NAMES[arm]} | {tried} | {rec['setting']} | {','.join(map(str, seeds))} | {_ms(devs)} | "
            f"{', '.join(f'{100 * x:.2f}' for x in devs)} | {ci} | {mde} | {'yes' if rec['match'] else 'NO'} | "
            f"{statistics.median(rec['s_step']):.3f} | {params} |")


def cmd_table(a) -> None:
    s = SUITES[a.suite](a)
    lines = [f"{type(s).__doc__}\nRuns under {s.root}; tuning seed {TUNE_SEED}; OPDF lambda {s.lam}.\n"]
    if s.teacher_eval.is_file():
        t = json.loads(s.teacher_eval.read_text())
        lines.append(f"Teacher: {100 * next(iter(t['metrics'].values())):.2f} on {t['examples']} {s.reported} examples.\n")
    rep, tun = s.reported, s.tuned_on
    for method, (desc, _, arms) in s.methods.items():
        recs = {arm: arm_record(s, method, arm, a.seeds) for arm in arms}
        if not any(recs.values()):
            continue
        lines += [f"\n#### {method}: {desc}\n",
                  f"| arm | settings tried: {tun} acc. (seed 1) | chosen | seeds | {rep} acc. (mean ± sd) | per seed | "
                  f"arm - dense, paired per seed: mean [95% CI] (points) | min. detectable effect (points) | "
                  f"= merged `tdkd eval` | s/step (median) | params training / inference |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_arm_row(arm, rec, recs.get("dense")) for arm, rec in recs.items()]
    verdicts = [f"- {c['method']}, {ARM_NAMES[c['arm']]} - dense: {_ci_text(c)} points over {c['n']} seeds: "
                f"{_verdict(c)}" for c in comparisons(s, a.seeds)]
    print("\n".join(lines + ["\n#### Verdicts (paired per seed, t interval)\n"] + verdicts + _contrast_lines(s, a.seeds)))


def _contrast_lines(s: Suite, seeds: list[int]) -> list[str]:
    """The suite's method-vs-method contrasts of dense arms, paired per seed (how much a method itself adds)."""
    lines = []
    for method, other, meaning in s.contrasts:
        a_rec, b_rec = arm_record(s, method, "dense", seeds), arm_record(s, other, "dense", seeds)
        if not (a_rec and b_rec):
            continue
        st = paired_stats(_paired(a_rec, b_rec))
        if st:
            lines.append(f"- {method} - {other} (dense arms; {meaning}): {_ci_text(st)} points over {st['n']} seeds")
    return ["\n#### Method against method (dense arms, paired per seed)\n"] + lines if lines else []


def _ci_text(c: dict) -> str:
    return f"{100 * c['mean']:+.2f} [{100 * c['lo']:+.2f}, {100 * c['hi']:+.2f}]"


def _verdict(c: dict) -> str:
    return "positive" if c["lo"] > 0 else "negative" if c["hi"] < 0 else "not distinguishable from 0"


def cmd_summary(a) -> None:
    """One table over several suites: every arm - dense comparison with its uncorrected 95% interval,
    minimum detectable effect, paired-t p, Holm-adjusted p over the whole family (every comparison
    listed), and the training-time ratio (median train seconds of the arm / of dense)."""
    family = []
    for spec in a.suites:  # SUITE or SUITE:METHOD,METHOD (only those methods)
        name, _, only = spec.partition(":")
        family += [c for c in comparisons(SUITES[name](a), a.seeds) if not only or c["method"] in only.split(",")]
    adjusted = holm([c["p"] for c in family])
    lines = [f"Family: {len(family)} comparisons (every non-dense arm against its method's dense arm in "
             f"{', '.join(a.suites)}); Holm-Bonferroni adjustment at family-wise 5%.\n",
             "| suite | method | arm | seeds | arm - dense: mean [95% CI, uncorrected] (points) | min. detectable effect "
             "(points, 80% power) | p (paired t) | p (Holm) | verdict after Holm | training time (x dense) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c, p_adj in zip(family, adjusted):
        verdict = ("positive" if c["mean"] > 0 else "negative") if p_adj < 0.05 else "no effect detected"
        lines.append(f"| {c['suite']} | {c['method']} | {ARM_NAMES[c['arm']]} | {c['n']} | {_ci_text(c)} | "
                     f"{100 * c['mde']:.2f} | {c['p']:.3f} | {p_adj:.3f} | {verdict} | {c['time_x']:.2f} |")
    print("\n".join(lines))


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
    for name in ("run", "table", "figures", "summary"):
        p = sub.add_parser(name)
        if name == "summary":
            p.add_argument("--suites", nargs="+", required=True, help="SUITE or SUITE:METHOD,METHOD,...")
        else:
            p.add_argument("--suite", default="sst2-cut", choices=list(SUITES))
        p.add_argument("--out", default="runs/grid")
        p.add_argument("--glue", default="../shared/data/glue")
        p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
        if name == "run":
            p.add_argument("--methods", nargs="+", default=None)
        if name == "figures":
            p.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    {"run": cmd_run, "table": cmd_table, "figures": cmd_figures, "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    main()

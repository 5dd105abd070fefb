"""Graph distillation on the public Planetoid splits, run with tdkd itself (README, "Graphs").

    python benchmarks/graph_kd.py run --seeds 1 2 3 4 5            # Cora and CiteSeer, every arm
    python benchmarks/graph_kd.py table --seeds 1 2 3 4 5          # mean +- sd per arm (markdown)

Per data set and seed: a GCN teacher (recipe graph-teacher), the MLP alone (graph-mlp), and the
MLP distilled from that seed's teacher with GLNN's loss, dense (graph-glnn --no-mpo
--tensor-lambda 0) and over-parameterized with the tensor constraint (graph-glnn, MPO + L_aux);
optionally (--lsp) a GCN of width 16 distilled from the teacher with LSP. Each run's best
checkpoint (best validation accuracy) is scored on the test nodes with `tdkd eval --json`. A run
whose eval.json exists is skipped, an unfinished one is replaced, so the command can be rerun
after an interruption. Everything lands under --out (default runs/graph).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdkd_cli.io.checkpoint import atomic_write_text  # noqa: E402

TDKD = [sys.executable, "-m", "tdkd_cli"]
ARMS = {  # name -> (recipe, extra options, needs the teacher)
    "teacher": ("graph-teacher", [], False),
    "mlp": ("graph-mlp", [], False),
    "glnn-dense": ("graph-glnn", ["--no-mpo", "--tensor-lambda", "0"], True),
    "glnn-mpo": ("graph-glnn", [], True),
}
LSP_ARM = {"lsp-gcn16": ("graph-lsp", [], True), "gcn16": ("graph-teacher", ["--student", "gcn:hidden=16"], False),
           "lsp-gcn16-klt": ("graph-lsp", ["--method", "lsp:weight=1,student=convs.0,teacher=convs.0,kernel=rbf,kl=teacher"], True),
           "kd-gcn16": ("graph-lsp", ["--method", "lsp:weight=0,student=convs.0,teacher=convs.0"], True)}
NAMES = {"teacher": "GCN teacher (width 64)", "mlp": "MLP alone", "glnn-dense": "GLNN MLP student, dense",
         "glnn-mpo": "GLNN MLP student, MPO + tensor constraint", "gcn16": "GCN width 16 alone",
         "lsp-gcn16": "GCN width 16, KD + LSP from the teacher (MPO + tensor constraint)",
         "lsp-gcn16-klt": "the same, LSP's KL reversed (kl=teacher, as the authors' code)",
         "kd-gcn16": "the same without LSP (weight 0): KD + tensor constraint"}


def run_arm(out: Path, data: str, arm: str, seed: int, arms: dict, setting: str = "transductive") -> dict:
    recipe, extra, needs_teacher = arms[arm]
    run = out / folder(data, setting) / f"{arm}-s{seed}"
    done = run / "eval.json"
    if done.is_file():
        return json.loads(done.read_text())
    cmd = [*TDKD, "distill", "--recipe", recipe, "--data", f"builtin:{data}", "--seed", str(seed), "-o", str(run),
           "--json", "--graph-setting", setting, *extra]
    if needs_teacher:
        cmd += ["--teacher", str(out / folder(data, setting) / f"teacher-s{seed}" / "best")]
    if run.exists():
        cmd.append("--force")
    run.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    ev = json.loads(subprocess.run([*TDKD, "eval", str(run / "best"), "--data", f"builtin:{data}", "--json"],
                                   check=True, capture_output=True, text=True).stdout)
    result = {"arm": arm, "data": data, "seed": seed, "test": ev["metrics"]["accuracy"], "val": ev["metrics"]["val_accuracy"],
              "best_step": summary["best"]["step"], "train_seconds": summary["train_seconds"],
              "params_training": summary["params_training"], "params_inference": summary["params_inference"],
              "aligned_cores": summary["aligned_cores"]}
    atomic_write_text(done, json.dumps(result, indent=1) + "\n")
    print(f"{data} ({setting}) {arm} seed {seed}: test {result['test']:.4f} val {result['val']:.4f}", flush=True)
    return result


def folder(data: str, setting: str) -> str:
    """Runs of the transductive setting under DATA/ (as before), of the inductive one under DATA-inductive/."""
    return data if setting == "transductive" else f"{data}-{setting}"


def table(out: Path, datasets, seeds, arms: dict, setting: str = "transductive") -> str:
    lines = [f"Setting: {setting}.\n", "| data | configuration | test accuracy (%) | val accuracy (%) | seeds | params training / deployed |",
             "|---|---|---|---|---|---|"]
    for data in datasets:
        for arm in arms:
            rows = [json.loads(p.read_text()) for s in seeds
                    if (p := out / folder(data, setting) / f"{arm}-s{s}" / "eval.json").is_file()]
            if not rows:
                continue
            t = [100 * r["test"] for r in rows]
            v = [100 * r["val"] for r in rows]
            sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
            lines.append(f"| {data} | {NAMES[arm]} | {statistics.mean(t):.2f} ± {sd(t):.2f} | {statistics.mean(v):.2f} ± "
                         f"{sd(v):.2f} | {len(rows)} | {rows[0]['params_training']:,} / {rows[0]['params_inference']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--out", type=Path, default=Path("runs/graph"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--data", nargs="+", default=["cora", "citeseer"])
    ap.add_argument("--lsp", action="store_true", help="also the LSP arms (a GCN of width 16, alone and distilled)")
    ap.add_argument("--setting", choices=["transductive", "inductive"], default="transductive",
                    help="inductive: the test nodes' edges hidden while training (teacher and students); scored on the full graph")
    a = ap.parse_args()
    arms = {**ARMS, **(LSP_ARM if a.lsp else {})}
    if a.command == "run":
        for data in a.data:
            for seed in a.seeds:
                for arm in arms:
                    run_arm(a.out, data, arm, seed, arms, a.setting)
    print(table(a.out, a.data, a.seeds, arms, a.setting))


if __name__ == "__main__":
    main()

"""The suites of the booster grid (benchmarks/booster_grid.py): per task its data (with a split to tune
on that is never the reported one), teacher, the options every run shares, the methods and their arms,
the OPDF lambda and the learning-rate settings tried per arm.

Part 2 of docs/results.md: sst2-cut, sst2-narrow, sst2-narrow-long, digits-cnn (kd, feature, relation,
dml, one). Part 3: graph-cora and graph-citeseer (GLNN MLP students, LSP GCN students, the students alone),
digits-datafree (KD on `tdkd synthesize` images vs on the real images) and digits-cnn's crd method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opdf_experiments import cmd_run as train_teachers
from opdf_experiments import distill, tdkd
from tdkd_cli.io.checkpoint import atomic_write_text

ARM_NAMES = {"dense": "dense", "mpo": "MPO, lambda=0", "opdf": "OPDF (MPO + constraint)"}
TUNE_SEED = 1


class Suite:
    """One task: its data (with a 'heldout' split cut from the training data), teacher, the options
    every run shares, the methods, the OPDF lambda and the learning-rate settings tried per arm."""

    name = ""
    lam = "100"
    eval_options: list[str] = []
    reported, tuned_on = "dev", "held-out"  # the split scored for the tables, the one the settings are chosen on
    # (method, other method, what the difference measures): dense arms compared per seed, beside the verdicts
    contrasts: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, a):
        self.root, self.teachers, self.glue = Path(a.out) / self.name, Path(a.out) / "teacher", Path(a.glue)
        self.data = self.root / "data"

    @property
    def teacher_eval(self) -> Path:
        """The merged teacher's `tdkd eval --json` on the reported split (written by prepare)."""
        return self.teacher.parent / "teacher-run" / "eval-merged.json"

    def data_options(self) -> list[str]:
        """What every run trains and validates on: the data, and the split its checkpoints are chosen on."""
        return ["--data", str(self.data), "--dev-split", "heldout"]

    def scores(self, merged: Path, metric: str) -> dict:
        """A merged student's ``metric`` on the reported split ("dev") and on the tuning split ("heldout")."""
        res = {}
        for split in ("dev", "heldout"):
            ev = json.loads(tdkd("eval", str(merged), "--data", str(self.data), *self.eval_options, "--split", split,
                                 "--json", capture=True))
            res[split] = ev["metrics"][metric]
        return res

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
    contrasts = (("crd", "kd", "what CRD adds to logit KD"),)

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
            "crd": ("CRD on the last stage (weight 0.8, 128-d heads, 1,024 negatives) + logit KD",
                    [*student, "--method", "crd:weight=0.8,student=layer4,teacher=layer4"], ("dense", "mpo", "opdf")),
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




class DigitsDatafree(DigitsCNN):
    """Data-free digits: digits-cnn's ResNet teacher and quarter-width student, the student distilled on
    2,000 images `tdkd synthesize` made from the teacher alone (generator-based DeepInversion, the
    command's defaults) and, beside it, on the real training images; both validated on the real
    held-out slice, scored on the real dev split."""

    name = "digits-datafree"
    contrasts = (("synth", "real", "what having no real training image costs"),)

    def __init__(self, a):
        super().__init__(a)
        self.synth, self.data = self.root / "synth", Path(a.out) / "digits-cnn" / "data"  # digits-cnn's real images
        student = ["--student", "resnet-digits-small", "--init", "random"]
        self.methods = {
            "synth": ("logit KD (alpha=1, T=4) on the synthesized images", student, ("dense", "mpo", "opdf")),
            "real": ("the same on the real training images", [*student, "--data", str(self.data)], ("dense",)),
        }

    def base(self) -> list[str]:
        """recipes/digits-datafree.yaml (300 steps of 64, AdamW, 10% warm-up then linear decay, n = 5,
        alpha 1, T 4), evaluation on the real held-out images every 50 steps."""
        return ["--recipe", "digits-datafree", "--teacher", str(self.teacher), "--eval-every", "50",
                "--save-every", "1000", "--keep-last", "1"]

    def data_options(self) -> list[str]:
        return ["--data", str(self.synth), "--dev-data", str(self.data), "--dev-split", "heldout"]

    def prepare(self, a) -> None:
        """digits-cnn's data and teacher, then the synthesized images (resumed if interrupted)."""
        DigitsCNN(a).prepare(a)
        if not (self.synth / "synthesis.json").is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            tdkd("synthesize", str(self.teacher), "--count", "2000", "--classes", "builtin:digits", "-o", str(self.synth),
                 "--json", capture=True)


class GraphSuite(Suite):
    """A citation graph's public split: a GCN teacher (recipe graph-teacher, seed 0, width 64), students
    tuned on the validation nodes and scored on the test nodes; 10 seeds change initialisation and
    dropout, the split is fixed."""

    lr, lam = ("0.01", "0.02", "0.002"), "1"
    reported, tuned_on = "test", "validation"
    dataset = ""
    contrasts = (("glnn", "mlp-alone", "what GLNN's KD adds to the MLP"),
                 ("lsp", "gcn16-alone", "what KD + LSP add to the width-16 GCN"))

    def __init__(self, a):
        super().__init__(a)
        self.graph = f"builtin:{self.dataset}"
        self.teacher = self.teachers / self.name / "teacher-run" / "best"
        mlp, gcn16 = "mlp:hidden=64,layers=2,dropout=0.5", "gcn:hidden=16,layers=2,dropout=0.5"
        self.methods = {
            "glnn": ("GLNN: logit KD on every node (alpha 1, T 1), MLP student (width 64)",
                     ["--recipe", "graph-glnn", "--student", mlp], ("dense", "mpo", "opdf")),
            "lsp": ("LSP on the first layer (weight 1, RBF) + logit KD, GCN student of width 16",
                    ["--recipe", "graph-lsp", "--student", gcn16], ("dense", "mpo", "opdf")),
            "mlp-alone": ("the MLP student alone (labels only, Adam with L2 5e-4), no teacher",
                          ["--recipe", "graph-mlp", "--student", mlp, "--teacher", "none"], ("dense",)),
            "gcn16-alone": ("the GCN student of width 16 alone (labels only, Adam with L2 5e-4), no teacher",
                            ["--recipe", "graph-teacher", "--student", gcn16, "--teacher", "none"], ("dense",)),
        }

    @property
    def teacher_eval(self) -> Path:
        return self.teacher.parent / "eval.json"

    def base(self) -> list[str]:
        """The recipes' 200 full-graph epochs (Adam, constant learning rate), validated every epoch."""
        return ["--teacher", str(self.teacher), "--keep-last", "1"]

    def data_options(self) -> list[str]:
        return ["--data", self.graph]

    def scores(self, merged: Path, metric: str) -> dict:
        ev = json.loads(tdkd("eval", str(merged), "--data", self.graph, "--json", capture=True))["metrics"]
        return {"dev": ev["accuracy"], "heldout": ev["val_accuracy"]}

    def prepare(self, a) -> None:
        run = self.teacher.parent
        distill(run, "--recipe", "graph-teacher", "--data", self.graph, "--seed", "0")
        if not self.teacher_eval.is_file():
            atomic_write_text(self.teacher_eval, tdkd("eval", str(self.teacher), "--data", self.graph, "--json", capture=True))


class GraphCora(GraphSuite):
    __doc__ = "Cora (2,708 nodes, 7 classes). " + GraphSuite.__doc__
    name, dataset = "graph-cora", "cora"


class GraphCiteSeer(GraphSuite):
    __doc__ = "CiteSeer (3,327 nodes, 6 classes). " + GraphSuite.__doc__
    name, dataset = "graph-citeseer", "citeseer"


SUITES = {s.name: s for s in (SST2Cut, SST2Narrow, SST2NarrowLong, DigitsCNN, DigitsDatafree, GraphCora, GraphCiteSeer)}

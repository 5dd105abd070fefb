"""Run tdkd on a list of bad inputs and print a markdown table: input, command, exit code, message.

    .venv/bin/python benchmarks/error_table.py > /tmp/errors.md     (docs/ERRORS.md holds its output)

Every case runs the real console entry point in a subprocess (offline) on tiny models built in a
temporary directory; the table shows what a user sees on stderr (the last line) and the exit code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tdkd_cli  # noqa: E402,F401

from tests.helpers import bert_classifier, sentiment_task, tiny_pair, wordpiece_tokenizer, POS, NEG, NEU  # noqa: E402


def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="tdkd-errors-"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TDKD_CACHE"] = str(d / "cache")
    task = sentiment_task(d)
    teacher = tiny_pair(d)
    from tdkd_cli.tools import ops

    ops.decompose_model(str(teacher), d / "mpo", n=3)
    _, other = bert_classifier(d, hidden=32, layers=2, heads=4, ffn=64, vocab=50, name="other")
    wordpiece_tokenizer(other, set(POS + NEG + NEU + ["x", "y"]))
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(d / "nohead")
    wordpiece_tokenizer(d / "nohead", set(POS + NEG + NEU))
    pickled = d / "pickled"
    pickled.mkdir()
    shutil.copy(teacher / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a pickle")
    corrupt = d / "corrupt"
    shutil.copytree(d / "mpo", corrupt)
    raw = bytearray((corrupt / "model.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(raw))
    trunc = d / "truncated"
    shutil.copytree(d / "mpo", trunc)
    raw = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    newer = d / "newer"
    shutil.copytree(d / "mpo", newer)
    (newer / "tdkd.json").write_text((newer / "tdkd.json").read_text().replace('"format_version": 1', '"format_version": 9'))
    nocol = d / "nocol"
    nocol.mkdir()
    (nocol / "train.tsv").write_text("text\tlabel\ngood\t1\n")
    (nocol / "dev.tsv").write_text("text\tlabel\ngood\t1\n")
    badlab = d / "badlab"
    badlab.mkdir()
    (badlab / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tpositive\n")
    (badlab / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tpositive\n")
    empty = d / "empty"
    empty.mkdir()
    (empty / "train.tsv").write_text("sentence\tlabel\n")
    (d / "unknown.yaml").write_text("lr: 1e-4\nlearning_rate: 3\n")
    (d / "wrongtype.yaml").write_text("batch_size: big\n")
    (d / "pytag.yaml").write_text("!!python/object/apply:os.system ['echo pwned']\n")
    (d / "exists").mkdir()
    (d / "exists" / "keep.txt").write_text("x")
    run = [sys.executable, "-m", "tdkd_cli", "distill", "--data", str(task), "--device", "cpu"]
    run_ok = d / "run-ok"
    subprocess.run(run + ["--teacher", "none", "--student", str(teacher), "--no-mpo", "--max-steps", "2", "-o", str(run_ok)],
                   capture_output=True, env=os.environ)
    T = str(teacher)
    cases = [
        ("model path that does not exist", ["decompose", "./no-such-model", "-o", str(d / "o1")]),
        ("unknown hub name, offline", ["decompose", "someone/unknown-model", "-o", str(d / "o2")]),
        ("out-of-range option", ["decompose", T, "--n", "1", "-o", str(d / "o3")]),
        ("factor shape that does not multiply out", ["decompose", T, "--shapes", "32=5,5", "-o", str(d / "o4")]),
        ("existing output without --force", ["decompose", T, "-o", str(d / "exists")]),
        ("HF directory with only pickled weights", ["decompose", str(pickled), "-o", str(d / "o5")]),
        ("MPO checkpoint where a dense model is expected", ["decompose", str(d / "mpo"), "-o", str(d / "o6")]),
        ("dense model where MPO cores are expected", ["merge", T, "-o", str(d / "o7")]),
        ("corrupt tensor file (checksum)", ["merge", str(corrupt), "-o", str(d / "o8")]),
        ("truncated tensor file", ["merge", str(trunc), "-o", str(d / "o9")]),
        ("manifest from a newer format", ["merge", str(newer), "-o", str(d / "o10")]),
        ("data file without the task's columns", ["eval", T, "--data", str(nocol), "--task", "sst2"]),
        ("unknown label in the data", ["eval", T, "--data", str(badlab), "--task", "sst2"]),
        ("--device cuda without a GPU", ["eval", T, "--data", str(task), "--device", "cuda"]),
        ("unknown dtype", ["bench", T, "--dtype", "float8"]),
        ("recipe with an unknown key", ["distill", "--recipe", str(d / "unknown.yaml"), "-o", str(d / "r1")]),
        ("recipe value of the wrong type", ["distill", "--recipe", str(d / "wrongtype.yaml"), "-o", str(d / "r2")]),
        ("recipe that names code (YAML python tag)", ["distill", "--recipe", str(d / "pytag.yaml"), "-o", str(d / "r3")]),
        ("training data with missing columns", ["distill", "--data", str(nocol), "--task", "sst2", "--teacher", "none", "--student", T, "-o", str(d / "r4")]),
        ("training data with unknown labels", ["distill", "--data", str(badlab), "--task", "sst2", "--teacher", "none", "--student", T, "-o", str(d / "r5")]),
        ("empty training data", ["distill", "--data", str(empty), "--task", "sst2", "--dev-split", "none", "--teacher", "none", "--student", T, "-o", str(d / "r6")]),
        ("teacher and student with different vocabularies", ["distill", "--data", str(task), "--teacher", T, "--student", str(other), "-o", str(d / "r7")]),
        ("teacher without a classification head", ["distill", "--data", str(task), "--teacher", str(d / "nohead"), "--student-layers", "0", "-o", str(d / "r8")]),
        ("existing run directory without --resume/--force", ["distill", "--data", str(task), "--teacher", "none", "--student", T, "-o", str(run_ok)]),
        ("--force on a directory that is not a run", ["distill", "--data", str(task), "--teacher", "none", "--student", T, "-o", str(d / "exists"), "--force"]),
        ("--resume on a directory that is not a run", ["distill", "-o", str(d / "exists"), "--resume"]),
        ("--resume with a changed setting", ["distill", "-o", str(run_ok), "--resume", "--lr", "1"]),
        ("out-of-range training option", ["distill", "--data", str(task), "--teacher", "none", "--student", T, "--batch-size", "0", "-o", str(d / "r9")]),
        ("layer map naming a teacher layer that does not exist", ["distill", "--data", str(task), "--teacher", T, "--student-layers", "0,1", "--layer-map", "0,9", "-o", str(d / "r12")]),
        ("a run directory where a model is expected", ["merge", str(run_ok), "-o", str(d / "o11")]),
        ("student layer that does not exist", ["distill", "--data", str(task), "--teacher", T, "--student-layers", "0,7", "-o", str(d / "r10")]),
        ("loss becomes NaN (absurd learning rate)", ["distill", "--data", str(task), "--teacher", "none", "--student", T, "--no-mpo",
                                                     "--lr", "1e30", "--max-grad-norm", "0", "--weight-decay", "0", "--max-steps", "50",
                                                     "--save-every", "1", "--dev-split", "none", "--device", "cpu", "-o", str(d / "r11")]),
    ]
    print("| bad input | command | exit | message (last line of stderr) |")
    print("|---|---|---|---|")
    for what, args in cases:
        p = subprocess.run([sys.executable, "-m", "tdkd_cli", *args], capture_output=True, text=True, env=os.environ, timeout=300)
        last = (p.stderr.strip().splitlines() or [""])[-1].replace(str(d) + "/", "").replace("|", "\\|")
        shown = " ".join(a.replace(str(d) + "/", "") for a in args)
        print(f"| {what} | `tdkd {shown}` | {p.returncode} | {last} |")
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()

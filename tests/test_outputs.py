"""Full disks, damaged caches and failed starts: every write failure is one line (exit 3) naming
what, where and why, leaves nothing partial and can be continued; caches are checked before use;
the disk preflight; runs that failed before their first checkpoint; keep_best_only."""

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdkd_cli.engine import run_dir
from tdkd_cli.io import checkpoint

from .helpers import digits_folder, run_cli, sentiment_task, tiny_pair

REASON = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    return d, sentiment_task(d, n_train=64, n_dev=16), tiny_pair(d, dropout=0.0)


def _distill(env, run, capsys, *extra):
    d, task, teacher = env
    return run_cli(["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1", "--n", "3",
                    "--batch-size", "16", "--max-steps", "6", "--save-every", "2", "--eval-every", "2", "--log-every", "1",
                    "--tensor-lambda", "1", "--epochs", "2", "-o", str(run), *extra], capsys)


class Faults:
    """Make the writes whose path matches ``where`` fail with ``code`` (as the OS would), in the
    safetensors writer and in Python's own open(); ``after`` matching writes succeed first."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch
        self.real_save, self.real_open = checkpoint.save_tensors, builtins.open

    def arm(self, where: str, code: int, after: int = 0):
        state = {"left": after}

        def hit(path) -> bool:
            if where not in str(path):
                return False
            state["left"] -= 1
            return state["left"] < 0

        def save(tensors, path, metadata=None):
            if hit(path):
                raise Exception(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
            return self.real_save(tensors, path, metadata)

        def opener(file, mode="r", *a, **k):
            if any(c in mode for c in "wax") and hit(file):
                raise OSError(code, os.strerror(code), str(file))
            return self.real_open(file, mode, *a, **k)

        self.mp.setattr(checkpoint, "save_tensors", save)
        self.mp.setattr(builtins, "open", opener)
        self.mp.setattr(io, "open", opener)

    def disarm(self):
        self.mp.setattr(checkpoint, "save_tensors", self.real_save)
        self.mp.setattr(builtins, "open", self.real_open)
        self.mp.setattr(io, "open", self.real_open)


def _one_error(err: str) -> str:
    errors = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def _no_partial(root: Path) -> None:
    assert not [p for p in Path(root).rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _same_files(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


class _CapSys:
    """run_cli's capsys stand-in for module fixtures (output is not inspected)."""

    def readouterr(self):
        return type("R", (), {"out": "", "err": ""})()


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The same run, uninterrupted."""
    out = tmp_path_factory.mktemp("ref") / "run"
    rc, _, err = _distill(env, out, _CapSys())
    assert rc == 0, err
    return out


# (what fails, path fragment, errno, matching writes that succeed first, message fragment)
POINTS = [
    ("checkpoint", "/checkpoints/", errno.ENOSPC, 2, "cannot write checkpoint"),
    ("best model", "/.best.tmp-", errno.EROFS, 1, "cannot write best model"),
    ("metrics", "metrics.jsonl", errno.EACCES, 3, "cannot write metrics"),
    ("run directory", "/.run.tmp-", errno.ENOSPC, 0, "cannot write run directory"),
    ("teacher cache", "teacher-outputs", errno.EACCES, 0, "cannot write teacher cache"),
]


@pytest.mark.parametrize("what,where,code,after,says", POINTS, ids=[p[0] for p in POINTS])
def test_a_failed_write_is_one_line_leaves_nothing_partial_and_resumes_bitwise(env, reference, tmp_path, capsys,
                                                                              monkeypatch, what, where, code, after, says):
    monkeypatch.setenv("TDKD_CACHE", str(tmp_path / "cache"))  # an empty teacher cache: its first write fails
    faults = Faults(monkeypatch)
    run = tmp_path / "run"
    faults.arm(where, code, after)
    rc, _, err = _distill(env, run, capsys)
    faults.disarm()
    line = _one_error(err)
    assert rc == 3 and says in line and REASON[code] in line, line
    assert ("continue with: tdkd distill -o" in line) or ("run the same command again" in line)
    _no_partial(tmp_path)
    for cdir in run_dir.checkpoint_dirs(run):  # every checkpoint left is whole
        run_dir.check_complete(cdir)
    if run.exists() and (run / "metrics.jsonl").exists():
        for rec in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(rec)  # no cut line
    resume = ["--resume"] if run.exists() and run_dir.holds_models(run) else []
    rc, _, err = _distill(env, run, capsys, *resume)
    assert rc == 0, err
    last = run_dir.checkpoint_dirs(run)[-1]
    _same_files(last, run_dir.checkpoint_dirs(reference)[-1])
    _same_files(run / "best", reference / "best")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_merge_decompose_and_export_failures_are_one_line(env, tmp_path, capsys, monkeypatch, code):
    d, task, teacher = env
    faults = Faults(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier output")
    faults.arm("/.out.tmp-", code)
    rc, _, err = run_cli(["decompose", str(teacher), "-o", str(out), "--force", "--n", "3"], capsys)
    line = _one_error(err)
    assert rc == 3 and f"cannot write decomposed model {out}: {REASON[code]}" in line
    assert (out / "old.txt").read_text() == "earlier output"
    faults.disarm()
    rc, _, err = run_cli(["decompose", str(teacher), "-o", str(tmp_path / "mpo"), "--n", "3"], capsys)
    assert rc == 0, err
    faults.arm("/.merged.tmp-", code)
    rc, _, err = run_cli(["merge", str(tmp_path / "mpo"), "-o", str(tmp_path / "merged")], capsys)
    assert rc == 3 and f"cannot write merged model {tmp_path / 'merged'}: {REASON[code]}" in _one_error(err)
    faults.arm("model.onnx", code)
    rc, _, err = run_cli(["export", str(teacher), "-o", str(tmp_path / "model.onnx")], capsys)
    faults.disarm()
    assert rc == 3 and f"cannot write ONNX file {tmp_path / 'model.onnx'}: {REASON[code]}" in _one_error(err)
    _no_partial(tmp_path)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "model.onnx").exists()


# ----------------------------------------------------------------------------------------------
# A real small file system (tmpfs, mounted as root where the machine allows it)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(p.stderr or p.stdout).strip() or 'mount failed'})")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_real_full_file_system(env, tiny_fs, capsys, monkeypatch):
    run = tiny_fs / "run"
    rc, _, err = _distill(env, run, capsys)  # the preflight sees 1 MB free and refuses
    line = _one_error(err)
    assert rc == 3 and "not enough disk space for run" in line and "--keep-last 1" in line and not run.exists()
    monkeypatch.setattr(run_dir, "check_space", lambda out, plan: None)  # no preflight: the disk fills mid-write
    rc, _, err = _distill(env, run, capsys)
    line = _one_error(err)
    assert rc == 3 and "no space left on device" in line, line
    _no_partial(tiny_fs)


# ----------------------------------------------------------------------------------------------
# The preflight
# ----------------------------------------------------------------------------------------------
def test_preflight_refuses_what_cannot_fit_and_accepts_what_can(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 200_000)
    rc, _, err = _distill(env, tmp_path / "small", capsys)
    line = _one_error(err)
    assert rc == 3 and "not enough disk space for run" in line and "200.0 KB free" in line
    assert not (tmp_path / "small").exists()
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10**12)
    rc, out, err = _distill(env, tmp_path / "big", capsys)
    assert rc == 0, err
    assert "disk: a checkpoint takes about" in err and "1.0 TB free" in err


@pytest.mark.parametrize("mpo", [False, True])
def test_the_checkpoint_estimate_is_within_20_percent(env, tmp_path, capsys, mpo):
    run = tmp_path / "run"
    rc, out, err = _distill(env, run, capsys, "--json", "--mpo" if mpo else "--no-mpo",
                            *([] if mpo else ["--tensor-lambda", "0"]))
    assert rc == 0, err
    plan = json.loads(out)["disk"]
    cdir = run_dir.checkpoint_dirs(run)[-1]
    measured = sum(f.stat().st_size for f in cdir.rglob("*") if f.is_file())
    best = sum(f.stat().st_size for f in (run / "best").rglob("*") if f.is_file())
    assert abs(plan["checkpoint_bytes"] - measured) <= 0.2 * measured, (plan, measured)
    assert abs(plan["best_bytes"] - best) <= 0.2 * best, (plan, best)


# ----------------------------------------------------------------------------------------------
# Caches: damage is found, reported and rebuilt
# ----------------------------------------------------------------------------------------------
def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * max(0, n - len(text))
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _wrong_shape(header):
    header["logits"]["shape"] = [header["logits"]["shape"][0] // 2, header["logits"]["shape"][1] * 2]


def _other_version(header):
    header["__metadata__"]["version"] = "0"


DAMAGE = {"flipped bytes": _flip, "truncated": _truncate, "wrong shape": lambda p: _rewrite_header(p, _wrong_shape),
          "other version": lambda p: _rewrite_header(p, _other_version)}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_teacher_cache_is_reported_and_rebuilt(env, tmp_path, capsys, monkeypatch, damage):
    monkeypatch.setenv("TDKD_CACHE", str(tmp_path / "cache"))
    rc, _, err = _distill(env, tmp_path / "plain", capsys, "--no-teacher-cache")
    assert rc == 0, err
    rc, _, err = _distill(env, tmp_path / "first", capsys)
    assert rc == 0, err
    files = list((tmp_path / "cache" / "teacher-outputs").glob("*.safetensors"))
    assert len(files) == 1
    DAMAGE[damage](files[0])
    rc, _, err = _distill(env, tmp_path / "second", capsys)
    assert rc == 0, err
    notes = [x for x in err.splitlines() if "teacher cache" in x and "rebuilding it from the teacher" in x]
    assert len(notes) == 1 and "0 of 64 examples cached" in err, err
    # the rebuilt cache is whole again and the run equals one without a cache
    rc, _, err = _distill(env, tmp_path / "third", capsys)
    assert rc == 0 and "64 of 64 examples cached" in err and "rebuilding" not in err
    for run in ("second", "third"):
        _same_files(run_dir.checkpoint_dirs(tmp_path / run)[-1], run_dir.checkpoint_dirs(tmp_path / "plain")[-1])


def test_damaged_token_cache_and_digits_set_are_rebuilt(env, tmp_path, capsys, monkeypatch):
    from tdkd_cli.io import data

    d, task, teacher = env
    monkeypatch.setenv("TDKD_CACHE", str(tmp_path / "cache"))
    rc, _, err = _distill(env, tmp_path / "a", capsys, "--no-teacher-cache")
    assert rc == 0, err
    tokens = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert tokens
    for f in tokens:
        _flip(f)
    rc, _, err = _distill(env, tmp_path / "b", capsys, "--no-teacher-cache")
    assert rc == 0 and err.count("token cache") == len(tokens) and "tokenizing again" in err
    _same_files(run_dir.checkpoint_dirs(tmp_path / "a")[-1], run_dir.checkpoint_dirs(tmp_path / "b")[-1])
    notes = []
    root = data.digits_folder(tmp_path / "digits", notes.append)
    victim = sorted((root / "train" / "3").glob("*.png"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:20])  # a partial file
    (root / "dev" / "1" / sorted(os.listdir(root / "dev" / "1"))[0]).unlink()  # and a missing one
    data.digits_folder(tmp_path / "digits", notes.append)
    assert len(notes) == 1 and "do not match their checksum" in notes[0]
    assert victim.read_bytes() == good and len(list(root.rglob("*.png"))) == 1797


# ----------------------------------------------------------------------------------------------
# Failed starts and retention
# ----------------------------------------------------------------------------------------------
def test_an_undecodable_image_is_found_before_anything_is_written(tmp_path, capsys):
    folder = digits_folder(tmp_path / "digits", count=120, dev_from=80)
    bad = sorted((folder / "train").rglob("*.png"))[5]
    bad.write_bytes(b"not a png")
    run = tmp_path / "run"
    rc, _, err = run_cli(["distill", "--teacher", "none", "--student", "resnet-digits-small", "--init", "random",
                          "--no-mpo", "--data", str(folder), "--max-steps", "1", "-o", str(run)], capsys)
    assert rc == 2 and f"cannot decode image {bad}" in _one_error(err) and not run.exists()


def test_a_run_that_stopped_before_its_first_checkpoint_is_replaced(env, tmp_path, capsys, monkeypatch):
    faults = Faults(monkeypatch)
    run = tmp_path / "run"
    faults.arm("/.best.tmp-", errno.ENOSPC)  # the first write after run.json: best/ at the first evaluation
    rc, _, err = _distill(env, run, capsys)
    faults.disarm()
    assert rc == 3 and "run the same command again" in _one_error(err)
    assert run.is_dir() and not run_dir.holds_models(run)
    rc, _, err = _distill(env, run, capsys)  # no --force needed
    assert rc == 0 and f"replacing {run}: an earlier start stopped before its first checkpoint" in err
    rc, _, err = _distill(env, run, capsys)  # a run with checkpoints is still protected
    assert rc == 2 and "already exists" in _one_error(err)


def test_keep_best_only(env, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = _distill(env, run, capsys, "--keep-best-only", "--json")
    assert rc == 0, err
    assert not (run / "checkpoints").exists() and (run / "best" / "model.safetensors").is_file()
    assert json.loads(out)["checkpoint"] is None
    rc, _, err = run_cli(["merge", str(run / "best"), "-o", str(tmp_path / "merged")], capsys)
    assert rc == 0, err

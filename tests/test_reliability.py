"""No lost work: SIGKILL at random points + resume == uninterrupted (bitwise); SIGINT saves and
says how to resume; same seed -> same bits. No unsafe loading: random and mutated checkpoint files
only ever raise tdkd's own error. Full disk: one line, nothing partial, earlier outputs untouched."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tdkd_cli.io import checkpoint as ckpt
from tdkd_cli.engine import run_dir
from tdkd_cli.core.errors import TdkdError

from .helpers import run_cli, sentiment_task, tiny_pair

STEPS = 30


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    task = sentiment_task(d, n_train=256)
    teacher = tiny_pair(d)
    return d, task, teacher


def distill_cmd(task, teacher, out, *extra):
    return [sys.executable, "-m", "tdkd_cli", "distill", "--data", str(task), "--teacher", str(teacher),
            "--student-layers", "0,1", "--mpo-n", "3", "--tensor-lambda", "1e-2", "--batch-size", "8", "--grad-accum", "2",
            "--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "3", "--eval-every", "10", "--lr", "3e-3",
            "--log-every", "5", "--device", "cpu", "-o", str(out), *extra]


def sub_env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def final_tensors(run):
    from safetensors.torch import load_file

    last = run_dir.checkpoint_dirs(run)[-1]
    assert last.name == f"step-{STEPS:07d}"
    out = load_file(str(last / "model.safetensors"))
    out.update({f"state:{k}": v for k, v in load_file(str(last / "trainer_state.safetensors")).items()})
    return out


def same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(env):
    d, task, teacher = env
    run = d / "reference"
    p = subprocess.run(distill_cmd(task, teacher, run), capture_output=True, text=True, env=sub_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return final_tensors(run)


def test_same_seed_gives_bitwise_identical_checkpoints(env, reference):
    d, task, teacher = env
    run = d / "again"
    p = subprocess.run(distill_cmd(task, teacher, run), capture_output=True, text=True, env=sub_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert same_bits(final_tensors(run), reference)


def _wait_for_step(run: Path, proc, step: int, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        done = run_dir.checkpoint_dirs(run)
        if done and int(done[-1].name[5:]) >= step:
            return
        time.sleep(0.01)


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(env, reference):
    d, task, teacher = env
    rng = random.Random(7)
    kills = []
    for trial in range(3):
        run = d / f"killed{trial}"
        # the first start is killed in the middle of training, at a random step and a random moment
        # within it (possibly while a checkpoint is being written); later starts resume it.
        at = rng.randint(2, STEPS - 5)
        proc = subprocess.Popen(distill_cmd(task, teacher, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=sub_env())
        _wait_for_step(run, proc, at)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(max((int(p.name[5:]) for p in run_dir.checkpoint_dirs(run)), default=0))
        for _ in range(3):
            p = subprocess.run(distill_cmd(task, teacher, run, "--resume"), capture_output=True, text=True,
                               env=sub_env(), timeout=300)
            if p.returncode == 0:
                break
        assert p.returncode == 0, p.stderr[-2000:]
        assert same_bits(final_tensors(run), reference), f"trial {trial}: killed after checkpoint {kills[-1]}"
        assert not [x for x in os.listdir(run / "checkpoints") if x.startswith(".")]
    assert len(set(kills)) >= 2  # the kills landed at different points


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(env, reference):
    d, task, teacher = env
    run = d / "sigint"
    proc = subprocess.Popen(distill_cmd(task, teacher, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=sub_env())
    _wait_for_step(run, proc, 8)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted at step") and "--resume" in last
    step = int(last.split("at step ")[1].split()[0])
    assert (run / "checkpoints" / f"step-{step:07d}").is_dir()
    run_dir.check_complete(run / "checkpoints" / f"step-{step:07d}")
    assert "Traceback" not in err
    p = subprocess.run(distill_cmd(task, teacher, run, "--resume"), capture_output=True, text=True, env=sub_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert same_bits(final_tensors(run), reference)


def test_damaged_latest_checkpoint_is_skipped_on_resume(env, reference, capsys):
    d, task, teacher = env
    import shutil

    src = d / "reference"
    run = d / "damaged"
    shutil.copytree(src, run)
    dirs = run_dir.checkpoint_dirs(run)
    # keep two checkpoints before the end; corrupt the newer one
    for p in dirs[-1:]:
        shutil.rmtree(p)
    newer = run_dir.checkpoint_dirs(run)[-1]
    data = bytearray((newer / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (newer / "model.safetensors").write_bytes(bytes(data))
    p = subprocess.run(distill_cmd(task, teacher, run, "--resume"), capture_output=True, text=True, env=sub_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"skipping damaged checkpoint {newer.name}" in p.stderr
    assert same_bits(final_tensors(run), reference)


# ---------------------------------------------------------------------------------------------
# property-based: the checkpoint and manifest readers only ever raise tdkd's own errors
@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    from tdkd_cli.tools import ops

    from .helpers import bert_classifier

    d = tmp_path_factory.mktemp("prop")
    _, path = bert_classifier(d, hidden=16, layers=1, heads=2, ffn=32, vocab=30)
    ops.decompose_model(str(path), d / "mpo", n=3)
    return d / "mpo"


def _read_all(path: Path):
    manifest, tensors = ckpt.load_mpo_checkpoint(path)
    from tdkd_cli.io import model_files

    model_files.load_mpo_model(path)
    return manifest, tensors


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                           max_leaves=12)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_checkpoints_only_raise_tdkd_errors(good_ckpt, tmp_path_factory, data):
    import shutil

    d = tmp_path_factory.mktemp("mut")
    target = d / "ck"
    shutil.copytree(good_ckpt, target)
    kind = data.draw(st.sampled_from(["flip", "truncate", "random", "manifest-field", "manifest-random", "manifest-bytes"]))
    tfile, mfile = target / ckpt.TENSORS, target / ckpt.MANIFEST
    if kind == "flip":
        raw = bytearray(tfile.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        tfile.write_bytes(bytes(raw))
    elif kind == "truncate":
        raw = tfile.read_bytes()
        tfile.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "random":
        tfile.write_bytes(data.draw(st.binary(max_size=512)))
    elif kind == "manifest-field":
        m = json.loads(mfile.read_text())
        layer = next(iter(m["layers"].values()))
        key = data.draw(st.sampled_from(["format_version", "format", "n", "source", "tensors", "layers"] +
                                        [f"layer.{k}" for k in layer]))
        value = data.draw(json_values)
        if key.startswith("layer."):
            layer[key[6:]] = value
        else:
            m[key] = value
        mfile.write_text(json.dumps(m))
    elif kind == "manifest-random":
        mfile.write_text(json.dumps(data.draw(json_values)))
    else:
        mfile.write_bytes(data.draw(st.binary(max_size=256)))
    try:
        _read_all(target)
    except TdkdError:
        pass  # the only acceptable failure


# ---------------------------------------------------------------------------------------------
# full disk (simulated): one line, exit 3, nothing partial left, earlier output untouched
def test_full_disk_leaves_nothing_partial(env, tmp_path, capsys, monkeypatch):
    d, task, teacher = env
    from tdkd_cli.io import checkpoint

    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("earlier output")
    real = checkpoint.save_tensors

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))

    monkeypatch.setattr(checkpoint, "save_tensors", full)
    rc, _, err = run_cli(["decompose", str(teacher), "-o", str(out), "--force", "--n", "3"], capsys)
    assert rc == 3 and "cannot write decomposed model" in err and "no space left on device" in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "old.txt").read_text() == "earlier output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    run = tmp_path / "run"
    rc, _, err = run_cli(["distill", "--data", str(task), "--teacher", "none", "--student", str(teacher), "--no-mpo",
                          "--max-steps", "2", "--device", "cpu", "-o", str(run)], capsys)
    errors = [x for x in err.strip().splitlines() if x.startswith("error:")]  # progress lines go to stderr too
    assert rc == 3 and len(errors) == 1 and "no space left on device" in errors[0] and "Traceback" not in err
    assert err.strip().splitlines()[-1] == errors[0]
    assert not run_dir.checkpoint_dirs(run) and not (run / "best").exists()
    assert not [p for p in run.rglob(".*tmp-*")]
    monkeypatch.setattr(checkpoint, "save_tensors", real)


# ---------------------------------------------------------------------------------------------
# a damaged `source` block (the architecture a manifest rebuilds) is a tdkd error, never a crash
def _with_source(good, root, mutate):
    import shutil

    target = root / "ck"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(good, target)
    m = json.loads((target / ckpt.MANIFEST).read_text())
    mutate(m["source"])
    (target / ckpt.MANIFEST).write_text(json.dumps(m))
    return target


def _set(key, value):
    def mutate(src):
        where = src if key == "architecture" else src["config"]
        assert key in where, key  # the field exists in the stored config: the test changes it
        where[key] = value
    return mutate


@pytest.mark.parametrize("key,value,says", [
    ("num_attention_heads", 0, "source.config.num_attention_heads must be a positive integer"),
    ("hidden_size", -16, "source.config.hidden_size must be a positive integer"),
    ("intermediate_size", "32", "source.config.intermediate_size must be an integer"),
    ("layer_norm_eps", "tiny", "source.config.layer_norm_eps must be a finite number"),
    ("is_decoder", 3, "source.config.is_decoder must be true or false"),
    ("vocab_size", 10**9, "source describes bert.embeddings.word_embeddings.weight as [1000000000, 16]"),
    ("num_hidden_layers", 10**9, "source.config.num_hidden_layers asks for 1000000000 repeated modules"),  # hung CI
    ("num_attention_heads", 3, "source.config does not build a BertForSequenceClassification"),
    ("architecture", "NoSuchModel", "transformers has no model class 'NoSuchModel'"),
])
def test_damaged_source_config_names_the_field(good_ckpt, tmp_path, capsys, key, value, says):
    target = _with_source(good_ckpt, tmp_path, _set(key, value))
    from tdkd_cli.io import model_files

    with pytest.raises(TdkdError, match=re.escape(says)):
        model_files.load_mpo_model(target)
    rc, out, err = run_cli(["merge", str(target), "-o", str(tmp_path / "merged")], capsys)
    assert rc == 1 and err.count("\n") == 1 and says in err and "internal error" not in err
    assert not (tmp_path / "merged").exists()


config_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([10**9, 2**31, 0.5, -1.5]),
                          st.text(max_size=4), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_source_config_only_raises_tdkd_errors(good_ckpt, tmp_path_factory, data):
    """Every loader (manifest, MPO model, any model, a forward pass of what loads) fails only with
    tdkd's error type however the source block's fields are changed."""
    from tdkd_cli.io import model_files, models

    cfg = json.loads((good_ckpt / ckpt.MANIFEST).read_text())["source"]["config"]
    changes = data.draw(st.dictionaries(st.sampled_from(sorted(cfg) + ["architecture", "model_type"]), config_values,
                                        min_size=1, max_size=3))

    def mutate(src):
        for k, v in changes.items():
            (src if k == "architecture" else src["config"])[k] = v

    target = _with_source(good_ckpt, tmp_path_factory.mktemp("src"), mutate)
    try:
        ckpt.read_manifest(target)
        loaded = model_files.load_any(str(target))
        models.forward_output(loaded.model, loaded.family, models.probe_inputs(loaded.model, loaded.family))
    except TdkdError:
        pass

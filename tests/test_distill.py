"""`tdkd distill` on tiny models: equivalence at initialisation, gradient accumulation through the
cores, learning, resume, checkpoints that merge/eval accept, recipes, and bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdkd_cli.io import layers, model_files
from tdkd_cli.tensor import constraint, mpo, tensorize
from tdkd_cli.tools import ops
from tdkd_cli.core import recipe
from tdkd_cli.engine import run_dir

from .helpers import (NEG, NEU, POS, bert_classifier, digits_folder, run_cli, sentiment_task, tiny_pair, tiny_vit_dir,
                      wordpiece_tokenizer)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    task = sentiment_task(d)
    teacher = tiny_pair(d)
    return d, task, teacher


def base_args(task, out, *extra):
    return ["distill", "--data", str(task), "-o", str(out), "--device", "cpu", "--batch-size", "16", "--lr", "3e-3",
            "--log-every", "5", *extra]


def metrics(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
def test_mpo_student_forward_equals_dense_at_init(setup):
    d, _, teacher = setup
    from tdkd_cli.io import models

    dense = models.load_model(str(teacher))
    mpo_form = models.load_model(str(teacher))
    names = tensorize.select_targets(mpo_form.model, tensorize.default_targets(mpo_form.model, "hf"))
    tensorize.tensorize(mpo_form.model, tensorize.plan_layers(mpo_form.model, names, 5))
    probe = models.probe_inputs(dense.model, "hf", batch=3, seq_len=9)
    a = models.forward_output(dense.model, "hf", probe)
    b = models.forward_output(mpo_form.model, "hf", probe)
    with tensorize.RebuiltWeights(mpo_form.model, grad=False):
        c = models.forward_output(mpo_form.model, "hf", probe)
    assert (a - b).abs().max() < 1e-5 and torch.equal(b, c)
    assert sum(p.numel() for p in mpo_form.model.parameters()) > sum(p.numel() for p in dense.model.parameters())


def test_accumulated_core_gradients_equal_per_microbatch_contraction(setup):
    """RebuiltWeights (one contraction per step, gradient pushed through it once) gives the same core
    gradients as contracting on every micro-batch."""
    _, _, teacher = setup
    from tdkd_cli.io import models

    grads = []
    for mode in ("per-micro", "once"):
        m = models.load_model(str(teacher)).model.train()
        names = tensorize.select_targets(m, tensorize.default_targets(m, "hf"))
        tensorize.tensorize(m, tensorize.plan_layers(m, names, 3))
        torch.manual_seed(0)
        batches = [torch.randint(5, 35, (4, 7), generator=torch.Generator().manual_seed(i)) for i in range(3)]
        rebuilt = tensorize.RebuiltWeights(m) if mode == "once" else None
        for ids in batches:
            torch.manual_seed(1)  # same dropout masks in both modes
            (m(input_ids=ids).logits.square().mean() / 3).backward()
        if rebuilt:
            rebuilt.backward()
            rebuilt.release()
        grads.append([c.grad.clone() for mod in tensorize.mpo_modules(m).values() for c in tensorize.layer_cores(mod)])
    assert len(grads[0]) > 0
    for g1, g2 in zip(*grads):
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)
        assert float(g1.abs().sum()) > 0


def test_contraction_happens_once_per_optimizer_step(setup, capsys, monkeypatch):
    d, task, teacher = setup
    calls = []
    real = mpo.contract
    monkeypatch.setattr(mpo, "contract", lambda cores, order="optimal": calls.append(1) or real(cores, order))
    rc, out, err = run_cli(base_args(task, d / "accum", "--teacher", str(teacher), "--student-layers", "0,1",
                                     "--n", "3", "--grad-accum", "4", "--batch-size", "8", "--max-steps", "3",
                                     "--dev-split", "none", "--json"), capsys)
    assert rc == 0, err
    n_layers = json.loads((d / "accum" / "checkpoints" / "step-0000003" / "tdkd.json").read_text())["layers"]
    assert len(n_layers) == 12 and len(calls) == 12 * 3


def test_short_run_lowers_training_loss_and_writes_a_run_directory(setup, capsys):
    d, task, teacher = setup
    run = d / "learn"
    rc, out, err = run_cli(base_args(task, run, "--teacher", "none", "--student", str(teacher), "--n", "3",
                                     "--max-steps", "100", "--warmup-ratio", "0.1", "--eval-every", "50", "--save-every", "25",
                                     "--keep-last", "2", "--log-every", "10", "--json"), capsys)
    assert rc == 0, err
    report = json.loads(out)
    recs = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(10, 101, 10))
    # tiny BERTs sit on the log(2) plateau for ~50 steps, then the loss falls
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=0.03)
    assert (recs[-1]["loss"] + recs[-2]["loss"]) / 2 < 0.5 * recs[0]["loss"], recs
    assert report["params_training"] > report["params_inference"]
    # last K full-state checkpoints kept, plus best/
    assert [p.name for p in run_dir.checkpoint_dirs(run)] == ["step-0000075", "step-0000100"]
    assert (run / "best" / "tdkd.json").is_file() and (run / "recipe.yaml").is_file()
    stored = recipe.read(str(run / "recipe.yaml"))
    assert stored["max_steps"] == 100 and stored["teacher"] == "none"
    evals = [r for r in metrics(run) if "eval" in r]
    assert [r["step"] for r in evals] == [50, 100]
    best = max(evals, key=lambda r: r["eval"]["accuracy"])
    # the best model merges to a plain HF model that eval scores exactly as recorded in training
    rc, _, err = run_cli(["merge", str(run / "best"), "-o", str(d / "learn-merged")], capsys)
    assert rc == 0, err
    rc, out, err = run_cli(["eval", str(d / "learn-merged"), "--data", str(task), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["metrics"]["accuracy"] == pytest.approx(best["eval"]["accuracy"])


def test_resume_from_mid_run_checkpoint_is_bitwise_identical(setup, capsys):
    d, task, teacher = setup
    args = ["--teacher", str(teacher), "--student-layers", "every-other", "--n", "3", "--tensor-lambda", "1e-2",
            "--hidden-weight", "0.5", "--max-steps", "12", "--save-every", "4", "--keep-last", "5", "--grad-accum", "2",
            "--batch-size", "8", "--eval-every", "6", "--json"]
    full = d / "full"
    rc, full_out, err = run_cli(base_args(task, full, *args), capsys)
    assert rc == 0, err
    part = d / "part"
    rc, _, err = run_cli(base_args(task, part, *args), capsys)
    assert rc == 0, err
    # forget everything after step 4, as if the run had been killed there
    for p in run_dir.checkpoint_dirs(part):
        if p.name != "step-0000004":
            import shutil

            shutil.rmtree(p)
    rc, out, err = run_cli(["distill", "-o", str(part), "--resume", "--json"], capsys)
    assert rc == 0, err
    resumed = json.loads(out)
    assert resumed["steps_run"] == 8 and resumed["final_metrics"] == json.loads(full_out)["final_metrics"] != {}
    # time of steps 1-4 from the first invocation is carried over: whole-run seconds per step
    state4 = json.loads((part / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert 0 < state4["train_seconds"] < resumed["train_seconds"]
    assert resumed["seconds_per_step"] == pytest.approx(resumed["train_seconds"] / 12, abs=1e-3)
    assert state4["timed_steps"] == 4
    # resuming a finished run trains nothing and reports the finished run's figures, not zeros
    rc, out, err = run_cli(["distill", "-o", str(part), "--resume", "--json"], capsys)
    again = json.loads(out)
    assert rc == 0 and again["steps_run"] == 0 and again["final_metrics"] == resumed["final_metrics"]
    state12 = json.loads((part / "checkpoints" / "step-0000012" / "trainer_state.json").read_text())
    assert again["train_seconds"] >= state12["train_seconds"] > state4["train_seconds"] and again["best"] == resumed["best"]
    a, b = tensors(full / "checkpoints" / "step-0000012"), tensors(part / "checkpoints" / "step-0000012")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = tensors_state(full / "checkpoints" / "step-0000012")
    sb = tensors_state(part / "checkpoints" / "step-0000012")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["step"] for r in metrics(part) if "loss" in r] == [r["step"] for r in metrics(full) if "loss" in r]


def tensors_state(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "trainer_state.safetensors"))


def test_distill_checkpoint_merges_and_evals(setup, capsys):
    d, task, teacher = setup
    run = d / "kd"
    rc, out, err = run_cli(base_args(task, run, "--teacher", str(teacher), "--student-layers", "0,1", "--n", "3",
                                     "--tensor-lambda", "1e-3", "--max-steps", "6", "--json"), capsys)
    assert rc == 0, err
    ck = run_dir.checkpoint_dirs(run)[-1]
    rc, out, err = run_cli(["merge", str(ck), "-o", str(d / "kd-merged"), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["layers"] == 12
    cfg = json.loads((d / "kd-merged" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    rc, out, err = run_cli(["eval", str(ck), "--data", str(task), "--json"], capsys)
    assert rc == 0, err
    for cmd in (["merge", str(run), "-o", str(d / "kd-merged-2")], ["eval", str(run), "--data", str(task)]):
        rc, out, err = run_cli(cmd, capsys)  # the run directory itself is not a model: say which ones are
        assert rc == 2 and f"is a tdkd distill run directory, not a model: pass {run / 'best'}" in err, err
    assert not (d / "kd-merged-2").exists()


def test_tensor_constraint_moves_student_cores_towards_teacher(setup, capsys):
    """With only the tensor constraint acting on the cores (mpo_lr > 0, KD on), the aligned
    auxiliary cores get closer to the teacher's."""
    d, task, teacher = setup
    from tdkd_cli.io import models

    dist = {}
    for lam in ("0", "10"):
        run = d / f"lam{lam}"
        rc, _, err = run_cli(base_args(task, run, "--teacher", str(teacher), "--student-layers", "0,1", "--n", "3",
                                       "--tensor-lambda", lam, "--max-steps", "8", "--dev-split", "none", "--json"), capsys)
        assert rc == 0, err
        loaded, _ = model_files.load_mpo_model(run_dir.checkpoint_dirs(run)[-1])
        t = models.load_model(str(teacher)).model
        t_cores, pairs = constraint.teacher_cores(loaded.model, t, layers.partner_fn(loaded.model, t))
        s_cores = {n: tensorize.layer_cores(m) for n, m in tensorize.mpo_modules(loaded.model).items()}
        dist[lam] = float(sum(((s_cores[p.student][k] - t_cores[p.teacher][k]) ** 2).sum() for p in pairs for k in p.cores).detach())
    assert dist["10"] < dist["0"]


def test_layer_map_chooses_the_constraint_partners(setup, capsys):
    """A student cut from teacher layers 0,1 and paired with them (--layer-map 0,1) starts with its
    auxiliary cores equal to its partners' (constraint 0 before the first update); the uniform map
    pairs it with teacher layers 1,3 instead (constraint > 0). The run records the map."""
    d, task, teacher = setup
    first = {}
    for name, extra in (("same", ["--layer-map", "0,1"]), ("uniform", [])):
        run = d / f"lmap-{name}"
        rc, out, err = run_cli(base_args(task, run, "--teacher", str(teacher), "--student-layers", "0,1", "--n", "3",
                                         "--tensor-lambda", "1", "--max-steps", "1", "--log-every", "1",
                                         "--dev-split", "none", "--json", *extra), capsys)
        assert rc == 0, err
        first[name] = metrics(run)[0]["tensor"]
        info = json.loads((run / "run.json").read_text())
        assert info["layer_map"] == ([0, 1] if name == "same" else [1, 3])
        partners = {p["teacher"].split(".layer.")[1].split(".")[0] for p in info["tensor_constraint"]}
        assert partners == ({"0", "1"} if name == "same" else {"1", "3"})
    assert first["same"] < 1e-9 < 1e-4 < first["uniform"]
    rc, _, err = run_cli(base_args(task, d / "lmap-bad", "--teacher", str(teacher), "--student-layers", "0,1",
                                   "--layer-map", "0,4", "--max-steps", "1"), capsys)
    assert rc == 2 and "layer_map '0,4': the teacher has layers 0..3 (got 4)" in err and not (d / "lmap-bad").exists()


# ---------------------------------------------------------------------------------------------
# recipes
def test_builtin_recipes_validate_and_list(capsys):
    names = recipe.builtin_names()
    assert "sst2-demo" in names and "paper-bert-base" in names
    for nm in names:
        r = recipe.read(nm)
        assert r.get("description"), nm
    rc, out, _ = run_cli(["recipes"], capsys)
    assert rc == 0 and "sst2-demo" in out


def test_recipes_copy(tmp_path, capsys):
    rc, out, err = run_cli(["recipes", "sst2-demo", "--copy", str(tmp_path / "mine.yaml")], capsys)
    assert rc == 0, err
    assert recipe.read(str(tmp_path / "mine.yaml")) == recipe.read("sst2-demo")
    rc, _, err = run_cli(["recipes", "sst2-demo", "--copy", str(tmp_path / "mine.yaml")], capsys)
    assert rc == 2 and "already exists" in err


def test_cli_overrides_recipe(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("lr: 1.0e-4\nbatch_size: 8\nteacher: none\n")
    r = recipe.resolve(str(f), {"lr": 2e-4, "batch_size": None})
    assert r["lr"] == 2e-4 and r["batch_size"] == 8 and r["teacher"] == "none" and r["n"] == 5


@pytest.mark.parametrize("text,msg", [
    ("lr: 1e-4\nlearning_rate: 3\n", "unknown key 'learning_rate'"),
    ("batch_size: big\n", "batch_size must be an integer"),
    ("mpo: 3\n", "mpo must be true or false"),
    ("lr: [1, 2\n", "not valid YAML"),
    ("!!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_bad_recipe_is_one_line_usage_error(tmp_path, capsys, text, msg):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    rc, _, err = run_cli(["distill", "--recipe", str(f), "-o", str(tmp_path / "run")], capsys)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# bad input
def test_bad_data_inputs(setup, tmp_path, capsys):
    d, task, teacher = setup
    cases = {}
    nocol = tmp_path / "nocol"
    nocol.mkdir()
    (nocol / "train.tsv").write_text("text\tlabel\ngood\t1\n")
    cases["nocol"] = (nocol, "has no column 'sentence'")
    badlab = tmp_path / "badlab"
    badlab.mkdir()
    (badlab / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tpositive\n")
    cases["badlab"] = (badlab, "unknown label 'positive'")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.tsv").write_text("sentence\tlabel\n")
    cases["empty"] = (empty, "has no examples")
    for name, (path, msg) in cases.items():
        rc, _, err = run_cli(["distill", "--teacher", "none", "--student", str(teacher), "--data", str(path),
                              "--task", "sst2", "--dev-split", "none", "-o", str(tmp_path / f"run-{name}")], capsys)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (tmp_path / f"run-{name}").exists()


def test_different_vocabularies_are_refused(setup, tmp_path, capsys):
    d, task, teacher = setup
    _, other = bert_classifier(tmp_path, hidden=32, layers=2, heads=4, ffn=64, vocab=50, name="other")
    wordpiece_tokenizer(other, set(POS + NEG + NEU + ["extra", "words"]))
    rc, _, err = run_cli(base_args(task, tmp_path / "run", "--teacher", str(teacher), "--student", str(other)), capsys)
    assert rc == 2 and "different vocabularies" in err, err


def test_existing_output_needs_resume_or_force(setup, tmp_path, capsys):
    d, task, teacher = setup
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = base_args(task, out, "--teacher", "none", "--student", str(teacher), "--no-mpo", "--max-steps", "2")
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "already exists" in err
    rc, _, err = run_cli(args + ["--force"], capsys)
    assert rc == 2 and "not a tdkd run directory" in err and (out / "precious.txt").read_text() == "keep me"
    rc, _, err = run_cli(args + ["--resume"], capsys)
    assert rc == 2 and "nothing to resume" in err
    run = tmp_path / "run2"
    rc, _, err = run_cli(base_args(task, run, "--teacher", "none", "--student", str(teacher), "--no-mpo", "--max-steps", "2"), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(base_args(task, run, "--teacher", "none", "--student", str(teacher), "--no-mpo", "--max-steps", "2", "--force"), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["distill", "-o", str(run), "--resume", "--lr", "1e-2"], capsys)
    assert rc == 2 and "lr differs" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path, capsys):
    d, task, teacher = setup
    run = tmp_path / "nan"
    # an absurd learning rate drives the weights to inf within a few steps
    rc, _, err = run_cli(base_args(task, run, "--teacher", "none", "--student", str(teacher), "--no-mpo", "--lr", "1e30",
                                   "--max-grad-norm", "0", "--max-steps", "50", "--save-every", "1", "--keep-last", "50",
                                   "--weight-decay", "0"), capsys)
    assert rc == 1 and ("NaN" in err or "infinite" in err) and "last good checkpoint" in err, err
    lines = err.strip().splitlines()  # the run's notes (disk plan) come first, then the one error line
    assert [x for x in lines if x.startswith("error:")] == lines[-1:] and "Traceback" not in err
    kept = run_dir.checkpoint_dirs(run)
    assert kept and all(run_dir.check_complete(p) for p in kept)
    for p in kept:
        assert all(bool(torch.isfinite(v).all()) for v in tensors(p).values() if v.is_floating_point())


def test_two_process_torchrun_on_cpu(setup, tmp_path):
    """2 processes x 1 micro-batch of 8 == 1 process x 2 micro-batches of 8 (same batches, no dropout):
    gradients are averaged across processes exactly as accumulation averages them."""
    d, task, _ = setup
    teacher = tiny_pair(tmp_path, dropout=0.0)
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torchrun = Path(sys.executable).parent / "torchrun"
    common = ["--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1", "--mpo-n", "3",
              "--tensor-lambda", "1e-2", "--batch-size", "8", "--max-steps", "4", "--save-every", "2", "--lr", "3e-3",
              "--device", "cpu", "--json"]
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tdkd_cli", "distill", *common, "-o", str(run)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    single = tmp_path / "single"
    p1 = subprocess.run([sys.executable, "-m", "tdkd_cli", "distill", *common, "--grad-accum", "2", "-o", str(single)],
                        capture_output=True, text=True, env=env, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    a, b = tensors(run / "checkpoints" / "step-0000004"), tensors(single / "checkpoints" / "step-0000004")
    assert a.keys() == b.keys()
    moved = tensors(run / "checkpoints" / "step-0000002")
    assert any(not torch.equal(a[k], moved[k]) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert json.loads(p.stdout)["world_size"] == 2
    kept = run_dir.checkpoint_dirs(run)
    assert [c.name for c in kept] == ["step-0000002", "step-0000004"]
    state = run_dir.check_complete(kept[-1])
    assert state["world_size"] == 2
    st = tensors_state(kept[-1])
    assert {"rng.cpu.0", "rng.cpu.1"} <= set(st)
    loaded, _ = model_files.load_mpo_model(kept[-1])  # one consistent, loadable checkpoint
    assert len(tensorize.mpo_modules(loaded.model)) == 12
    assert not any(n.startswith(".") for n in os.listdir(run / "checkpoints"))


def test_timm_image_folder_distill_merge_eval(tmp_path, capsys):
    root = digits_folder(tmp_path / "digits", count=120, dev_from=80)
    _, mdir = tiny_vit_dir(tmp_path / "vit")
    run = tmp_path / "run"
    rc, out, err = run_cli(["distill", "--teacher", str(mdir), "--student-layers", "1", "--data", str(root), "--n", "3",
                            "--tensor-lambda", "1e-2", "--batch-size", "16", "--max-steps", "4", "--device", "cpu",
                            "-o", str(run), "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["aligned_cores"] == 4 * 2 and report["dev_examples"] == 40 and report["best"]["metric"] == "top1"
    info = json.loads((run / "run.json").read_text())
    assert {p["teacher"] for p in info["tensor_constraint"]} == {"blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"}
    rc, _, err = run_cli(["merge", str(run / "best"), "-o", str(tmp_path / "merged")], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_args"]["depth"] == 1
    rc, out, err = run_cli(["eval", str(tmp_path / "merged"), "--data", str(root), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["metrics"]["top1"] == pytest.approx(report["best"]["value"])
    rc, _, err = run_cli(["distill", "--teacher", str(mdir), "--student-layers", "1", "--data", str(root),
                          "--hidden-weight", "1", "--device", "cpu", "-o", str(tmp_path / "run2")], capsys)
    assert rc == 2 and "timm" in err

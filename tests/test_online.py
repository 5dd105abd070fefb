"""Online KD (DML, ONE) and module replacement (BERT-of-Theseus): the losses against hand
computations, the replacement schedule, end-to-end runs on tiny models (dense and MPO) whose
outputs are plain models, bitwise resume of every peer, branch, gate and successor, bad input."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tdkd_cli.methods.schemes import branches, theseus
from tdkd_cli.methods import method_losses as ml
from tdkd_cli.core.errors import UsageError

from .helpers import digits_folder, run_cli, sentiment_task, tiny_pair


def _softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _ce(row, y):
    return -math.log(_softmax(row)[y])


Z = [[[1.0, -0.5, 2.0], [0.2, 0.1, -1.0]],
     [[0.5, 0.5, -0.2], [1.5, -0.3, 0.4]],
     [[-1.0, 2.0, 0.3], [0.0, 0.7, -0.6]]]
Y = [2, 0]


def test_dml_loss_equals_hand_computation_and_peers_are_targets_only():
    t = 2.0
    for k_peers in (2, 3):
        z = Z[:k_peers]
        want = 0.0
        for k in range(k_peers):
            ce = sum(_ce(z[k][i], Y[i]) for i in range(2)) / 2
            kl = sum(t * t * sum(_kl(_softmax(z[j][i], t), _softmax(z[k][i], t)) for i in range(2)) / 2
                     for j in range(k_peers) if j != k) / (k_peers - 1)
            want += ce + kl
        logits = [torch.tensor(x, requires_grad=True) for x in z]
        got = ml.dml_loss(logits, torch.tensor(Y), t)
        assert float(got.detach()) == pytest.approx(want, rel=1e-6)
        # peer k's gradient is that of its own loss alone: the other peers are detached targets
        got.backward()
        own = [torch.tensor(x, requires_grad=True) for x in z]
        loss0 = torch.nn.functional.cross_entropy(own[0], torch.tensor(Y)) + sum(
            ml._soft_kl(own[0], own[j].detach(), t) for j in range(1, k_peers)) / (k_peers - 1)
        loss0.backward()
        assert torch.allclose(logits[0].grad, own[0].grad, atol=1e-7)


def test_one_loss_equals_hand_computation_and_the_ensemble_is_detached_in_the_kl():
    t = 3.0
    gate = [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]
    ens = [[sum(gate[i][b] * Z[b][i][c] for b in range(3)) for c in range(3)] for i in range(2)]
    want = sum(_ce(ens[i], Y[i]) for i in range(2)) / 2
    for b in range(3):
        want += sum(_ce(Z[b][i], Y[i]) for i in range(2)) / 2
        want += t * t * sum(_kl(_softmax(ens[i], t), _softmax(Z[b][i], t)) for i in range(2)) / 2
    g = torch.tensor(gate, requires_grad=True)
    got = ml.one_loss([torch.tensor(x) for x in Z], g, torch.tensor(Y), t)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()
    # the gate learns from CE(ensemble) alone
    g2 = torch.tensor(gate, requires_grad=True)
    torch.nn.functional.cross_entropy(ml.one_ensemble([torch.tensor(x) for x in Z], g2), torch.tensor(Y)).backward()
    assert torch.allclose(g.grad, g2.grad, atol=1e-7)


def test_theseus_schedule_probabilities_seeded_and_reaching_one():
    assert theseus.probability(0, 0.3, 0.1) == pytest.approx(0.3)
    assert theseus.probability(4, 0.3, 0.1) == pytest.approx(0.7)
    assert theseus.probability(7, 0.3, 0.1) == 1.0 and theseus.probability(10_000, 0.3, 0.1) == 1.0
    assert theseus.steps_to_one(0.3, 0.1) == 7 and theseus.steps_to_one(0.3, 0.0) is None
    assert theseus.steps_to_one(1.0, 0.0) == 0
    for p in (0.0, 0.3, 0.8):
        draws = [x for step in range(1000) for x in theseus.draw(7, step, 0, 4, p)]
        assert abs(sum(draws) / len(draws) - p) < 0.025, p  # 4,000 draws: 3.2 standard deviations at p=0.5
    assert all(theseus.draw(7, step, 1, 6, 1.0)[g] for step in range(50) for g in range(6))
    assert theseus.draw(7, 5, 0, 6, 0.5) == theseus.draw(7, 5, 0, 6, 0.5)  # a resumed run draws the same
    assert [theseus.draw(7, 5, m, 6, 0.5) for m in range(8)] != [theseus.draw(8, 5, m, 6, 0.5) for m in range(8)]


def test_one_splits_bert_and_resnet_into_trunk_and_tail():
    from tdkd_cli.io.models import load_model

    model = load_model("resnet-digits-small", init="random", num_labels=10).model
    trunk, tail = branches.split(model, 1)
    assert trunk == ["layer1.0", "layer2.0", "layer3.0"] and tail == ["layer4.0", "fc"]
    with pytest.raises(UsageError, match="must leave a trunk"):
        branches.split(model, 4)


def test_one_later_branches_read_the_first_branchs_trunk_and_train_it():
    """Branch 1's logits equal a plain forward of the model with branch 1's tail in place (the
    replayed trunk is exact), and a loss on branch 1 alone reaches the trunk, not branch 0's tail."""
    import copy

    from tdkd_cli.methods import loss_terms
    from tdkd_cli.io.models import load_model
    from tdkd_cli.methods.schemes.base import swapped

    torch.manual_seed(0)
    model = load_model("resnet-digits-small", init="random", num_labels=10).model.eval()
    other = load_model("resnet-digits-small", init="random", num_labels=10, seed=1).model
    trunk, tail = branches.split(model, 1)
    copies = [[copy.deepcopy(other.get_submodule(p)) for p in tail]]
    scheme = branches.Branches(trunk, tail, copies, torch.nn.Linear(64, 2), 3.0, {})
    batch = {"x": torch.randn(4, 3, 32, 32)}
    run = lambda m: loss_terms.forward(m, "timm", batch)  # noqa: E731
    out = scheme.forward(model, batch, 0, 0, run)
    with torch.no_grad(), swapped(model, dict(zip(tail, copies[0]))):
        direct = model(batch["x"])
    assert torch.allclose(out.members[1], direct, atol=1e-5)
    assert not torch.allclose(out.members[0], out.members[1])
    assert out.gate.shape == (4, 2) and torch.allclose(out.gate.sum(-1), torch.ones(4))
    (out.members[1] ** 2).sum().backward()
    assert float(model.conv1.weight.grad.abs().sum()) > 0  # the shared trunk (stem) learns from branch 1
    assert model.fc.weight.grad is None and copies[0][1].weight.grad is not None


# ----------------------------------------------------------------------------------------------
# end to end on a tiny text task
@pytest.fixture(scope="module")
def text(tmp_path_factory):
    d = tmp_path_factory.mktemp("online")
    return d, sentiment_task(d), tiny_pair(d, dropout=0.0)


def _run(task, run, capsys, *extra):
    return run_cli(["distill", "--data", str(task), "--batch-size", "8", "--device", "cpu", "--dev-limit", "16",
                    "--log-every", "1", "--save-every", "1", "--keep-last", "9", "--eval-every", "2", "--lr", "2e-3",
                    "--max-steps", "4", "--json", "-o", str(run), *extra], capsys)


def _resume_is_bitwise(task, run, capsys, *extra):
    """Cut the run back to its step-2 checkpoint, resume it, and compare step 4 with the original."""
    half = run.parent / (run.name + "-half")
    shutil.copytree(run, half)
    for step in (3, 4):
        shutil.rmtree(half / "checkpoints" / f"step-{step:07d}")
    rc, _, err = _run(task, half, capsys, *extra, "--resume")
    assert rc == 0, err
    for name in ("model.safetensors", "trainer_state.safetensors"):
        a = load_file(str(run / "checkpoints" / "step-0000004" / name))
        b = load_file(str(half / "checkpoints" / "step-0000004" / name))
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("rng."):
                assert torch.equal(a[k], b[k]), (name, k)
    return load_file(str(run / "checkpoints" / "step-0000004" / "trainer_state.safetensors"))


def _plain_bert(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path))


def test_dml_cohort_of_an_mpo_and_a_dense_peer(text, capsys):
    d, task, teacher = text
    run = d / "dml"
    spec = "dml:peers=2,mpo=1+0,temperature=2"
    rc, out, err = _run(task, run, capsys, "--teacher", "none", "--student", str(teacher), "--student-layers", "0,1",
                        "--method", spec)
    assert rc == 0, err
    report = json.loads(out)
    assert report["scheme"]["members"] == ["peer-0", "peer-1"] and report["best"]["member"] in ("peer-0", "peer-1")
    assert set(report["final_metrics"]["members"]) == {"peer-0", "peer-1"}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dml"] > 0 and r["ce"] == 0.0 for r in rows if "dml" in r)
    state = _resume_is_bitwise(task, run, capsys, "--teacher", "none", "--student", str(teacher),
                               "--student-layers", "0,1", "--method", spec)
    assert any(k.startswith("peer-1.") for k in state)  # the dense peer lives in the trainer state
    first = load_file(str(run / "checkpoints" / "step-0000001" / "trainer_state.safetensors"))
    key = "peer-1.bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(first[key], state[key])  # ... and trains
    # peer 0 is MPO (merge it), peer 1 dense; both deploy as the plain 2-layer architecture
    for name in ("peer-0", "peer-1"):
        rc, _, err = run_cli(["merge", str(run / "members" / name), "-o", str(d / f"dml-{name}")], capsys)
        assert rc == 0, err
        assert _plain_bert(d / f"dml-{name}").config.num_hidden_layers == 2
    assert json.loads((run / "members" / "peer-0" / "tdkd.json").read_text())["layers"]
    assert not json.loads((run / "members" / "peer-1" / "tdkd.json").read_text())["layers"]


def test_one_branches_share_the_trunk_resume_bitwise_and_deploy_plain(text, capsys):
    d, task, teacher = text
    run = d / "one"
    # a pretrained body without a task head: each branch's head is initialised with seed + b
    body = d / "body"
    _plain_bert(teacher).bert.save_pretrained(body)
    for f in teacher.glob("tokenizer*"):
        shutil.copy(f, body / f.name)
    args = ("--teacher", "none", "--student", str(body), "--mpo", "--n", "3", "--method", "one:branches=2,layers=1",
            "--eval-every", "4")  # one evaluation, at the last step: best/ is then the best member as it ends
    rc, out, err = _run(task, run, capsys, *args)
    assert rc == 0, err
    report = json.loads(out)
    assert report["scheme"]["tail"] == ["bert.encoder.layer.3", "bert.pooler", "classifier"]
    state = _resume_is_bitwise(task, run, capsys, *args)
    assert {"one.gate.weight", "one.gate.bias"} <= set(state)
    assert float(state["one.gate.weight"].abs().max()) > 0  # the gate trained from zero
    merged = {}
    for name in ("branch-0", "branch-1"):
        rc, _, err = run_cli(["merge", str(run / "members" / name), "-o", str(d / f"one-{name}")], capsys)
        assert rc == 0, err
        merged[name] = _plain_bert(d / f"one-{name}").state_dict()
    a, b = merged["branch-0"], merged["branch-1"]
    assert a.keys() == b.keys()
    for k in a:
        shared = not any(k.startswith(p) for p in ("bert.encoder.layer.3.", "bert.pooler.", "classifier."))
        assert torch.equal(a[k], b[k]) == shared, k  # one trunk, two tails
    best = json.loads(out)["best"]["member"]
    rc, _, err = run_cli(["merge", str(run / "best"), "-o", str(d / "one-best")], capsys)
    assert rc == 0, err
    got = _plain_bert(d / "one-best").state_dict()
    assert all(torch.equal(got[k], merged[best][k]) for k in got)


def test_theseus_successor_replaces_groups_trains_and_deploys_alone(text, capsys):
    d, task, teacher = text
    run = d / "theseus"
    args = ("--teacher", str(teacher), "--alpha", "0", "--mpo", "--n", "3", "--tensor-lambda", "1e-3",
            "--method", "theseus:group=2,base=0.5,rate=0.2")
    rc, out, err = _run(task, run, capsys, *args)
    assert rc == 0, err
    info = json.loads((run / "run.json").read_text())
    assert info["scheme"]["groups"] == 2 and info["scheme"]["successor_alone_from_step"] == 3
    assert info["layer_map"] == [1, 3]  # successor g pairs with the last predecessor layer of its group
    assert {p["teacher"].split(".")[3] for p in info["tensor_constraint"]} == {"1", "3"}
    _resume_is_bitwise(task, run, capsys, *args)
    rc, _, err = run_cli(["merge", str(run / "best"), "-o", str(d / "th-merged")], capsys)
    assert rc == 0, err
    model = _plain_bert(d / "th-merged")
    assert model.config.num_hidden_layers == 2
    rc, out, err = run_cli(["eval", str(d / "th-merged"), "--data", str(task), "--limit", "16", "--json"], capsys)
    assert rc == 0 and json.loads(out)["metrics"]["accuracy"] == pytest.approx(json.loads(
        (run / "best" / "tdkd.json").read_text())["best"]["value"])


def test_theseus_successor_layers_learn_only_where_they_stand_in(text, capsys):
    """Dense successor, p = 0 (the predecessor always runs): the successor's layers get no gradient
    while its embeddings and head train; p = 1: its layers train too."""
    d, task, teacher = text
    init = load_file(str(teacher / "model.safetensors"))
    for p, moves in ((0.0, False), (1.0, True)):
        run = d / f"theseus-p{p}"
        rc, _, err = _run(task, run, capsys, "--teacher", str(teacher), "--alpha", "0", "--no-mpo", "--max-steps", "2",
                          "--method", f"theseus:group=2,base={p},rate=0")
        assert rc == 0, err
        got = load_file(str(run / "checkpoints" / "step-0000002" / "model.safetensors"))
        layer = "bert.encoder.layer.1.output.dense.weight"  # successor layer 1, cut from predecessor layer 2
        assert torch.equal(got[layer], init["bert.encoder.layer.2.output.dense.weight"]) != moves
        assert not torch.equal(got["classifier.weight"], init["classifier.weight"])


def test_bad_online_input_is_one_line_exit_2_nothing_written(text, capsys):
    d, task, teacher = text
    none = ["--teacher", "none", "--student", str(teacher)]
    cases = [
        (none + ["--method", "dml:peers=1"], "dml needs a cohort of at least 2 peers"),
        (none + ["--method", "one:branches=1"], "one needs at least 2 branches"),
        (none + ["--method", "one:layers=4"], "must leave a trunk"),
        (none + ["--method", "dml:peers=2,mpo=1"], "mpo= gives 1 values for 2 peers"),
        (["--teacher", str(teacher), "--student", str(teacher), "--method", "dml"], "no teacher is used; drop --teacher"),
        (["--teacher", str(teacher), "--student", str(teacher), "--method", "one"], "no teacher is used; drop --teacher"),
        (none + ["--method", "theseus"], "pass it as --teacher (the predecessor)"),
        (["--teacher", str(teacher), "--method", "theseus:group=3"], "group=3 does not divide the teacher's 4 layers"),
        (["--teacher", str(teacher), "--student-layers", "0", "--method", "theseus:group=2"], "the successor has 1 layers"),
        (["--teacher", str(teacher), "--method", "theseus:base=2"], "base is a probability"),
        (none + ["--method", "dml", "--method", "one"], "a run takes one of them"),
        (["--teacher", str(teacher), "--method", "theseus", "--method", "dkd"], "cannot be combined with the methods dkd"),
        (none + ["--method", "dml:peers=2.5"], "peers must be a whole number"),
        (none + ["--method", "dml:weight=2"], "dml is the whole loss, it takes no weight"),
    ]
    for extra, says in cases:
        out_dir = d / "bad"
        rc, out, err = _run(task, out_dir, capsys, *extra)
        assert rc == 2 and says in err and err.count("\n") == 1 and not out_dir.exists(), (extra, err)


def test_dml_peers_must_read_the_same_images(tmp_path, capsys):
    folder = digits_folder(tmp_path / "digits", count=120, dev_from=80)
    run = tmp_path / "bad"
    rc, _, err = run_cli(["distill", "--teacher", "none", "--student", "resnet-digits-small", "--init", "random",
                          "--data", str(folder), "--no-mpo", "--method", "dml:students=resnet-digits-small+resnet10t",
                          "--max-steps", "1", "--device", "cpu", "-o", str(run)], capsys)
    assert rc == 2 and err.count("\n") == 1 and not run.exists(), err
    assert "dml peer 1 (resnet10t) and peer 0 cannot learn from one batch: their inputs differ" in err


def test_online_methods_are_listed(capsys):
    rc, out, err = run_cli(["methods", "--json"], capsys)
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["dml"]["kind"] == rows["one"]["kind"] == "online" and rows["theseus"]["kind"] == "replacement"
    assert rows["theseus"]["options"]["rate"]["default"] == 0.001


# ----------------------------------------------------------------------------------------------
# a timm CNN on real digits: ONE (MPO) and DML (dense), each deploying a plain timm model
@pytest.mark.parametrize("spec,mpo", [("one:branches=2", "--mpo"), ("dml:peers=2", "--no-mpo")])
def test_online_on_a_cnn(tmp_path, capsys, spec, mpo):
    import timm

    folder = digits_folder(tmp_path / "digits", count=120, dev_from=80)
    run = tmp_path / "run"
    rc, out, err = run_cli(["distill", "--teacher", "none", "--student", "resnet-digits-small", "--init", "random",
                            "--data", str(folder), mpo, "--n", "3", "--lr", "3e-3", "--batch-size", "16", "--max-steps", "3",
                            "--device", "cpu", "--method", spec, "--json", "-o", str(run)], capsys)
    assert rc == 0, err
    report = json.loads(out)
    best = report["best"]["member"]
    assert best in report["scheme"]["members"]
    rc, _, err = run_cli(["merge", str(run / "best"), "-o", str(tmp_path / "merged")], capsys)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    plain = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg.get("model_args", {}))
    plain.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")))
    assert len(plain.layer4) == 1 and plain.fc.out_features == 10


def test_dml_runs_under_torchrun_as_accumulation_does(text, tmp_path):
    """2 processes x 1 micro-batch == 1 process x 2 micro-batches (no dropout), every peer included;
    ONE and Theseus refuse several processes with one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tdkd_cli.methods.schemes import online
    from tdkd_cli.core import recipe

    d, task, teacher = text
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    common = ["--data", str(task), "--teacher", "none", "--student", str(teacher), "--student-layers", "0,1",
              "--method", "dml:peers=2,mpo=1+0", "--mpo-n", "3", "--batch-size", "8", "--max-steps", "2", "--lr", "3e-3",
              "--device", "cpu", "--json"]
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tdkd_cli", "distill", *common,
                        "-o", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p1 = subprocess.run([sys.executable, "-m", "tdkd_cli", "distill", *common, "--grad-accum", "2", "-o", str(tmp_path / "one")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    for name in ("model.safetensors", "trainer_state.safetensors"):
        a = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-0000002" / name))
        b = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000002" / name))
        keys = [k for k in b if not k.startswith("rng.")]
        assert keys and any(k.startswith("peer-1.") for k in keys) == (name == "trainer_state.safetensors")
        for k in keys:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    for spec in ("one", "theseus"):
        r, _ = recipe.build(None, {"data": str(task), "teacher": None if spec == "one" else str(teacher),
                                   "student": str(teacher), "methods": [spec]})
        with pytest.raises(UsageError, match=f"{spec} does not run under torchrun"):
            online.check(r, 2)


@pytest.mark.parametrize("name", ["sst2-dml", "sst2-one", "sst2-theseus", "digits-dml", "digits-one"])
def test_shipped_online_recipes_run(text, tmp_path, capsys, name):
    """Each shipped online / replacement recipe trains 2 steps: the text ones with the tiny model in
    place of MiniLM (and as Theseus's predecessor), the digits ones as shipped."""
    d, task, teacher = text
    models = {"sst2-dml": ["--student", str(teacher), "--student-layers", "0,1", "--data", str(task)],
              "sst2-one": ["--student", str(teacher), "--student-layers", "0,1", "--data", str(task)],
              "sst2-theseus": ["--teacher", str(teacher), "--data", str(task)]}.get(name, [])
    rc, out, err = run_cli(["distill", "--recipe", name, *models, "--max-steps", "2", "--batch-size", "8",
                            "--dev-limit", "16", "--device", "cpu", "--log-every", "1", "--json", "-o", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["scheme"]["method"] == name.split("-")[1]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in recs)

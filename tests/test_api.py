"""The Python API (tdkd_cli.api, re-exported from the package root), the plug-in registry, the
examples/ scripts and the import contract."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tdkd_cli
from tdkd_cli import (DistillLoss, MPOConfig, TdkdError, TensorConstraint, load_mpo, merge, overparameterize,
                      param_groups, save_mpo)
from tdkd_cli.io import layers
from tdkd_cli.methods import losses, method_losses, plugins
from tdkd_cli.tensor import constraint, tensorize

from .helpers import bert_classifier, run_cli, sentiment_task, tiny_pair

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


def _bert(tmp_path, layers_=2, hidden=32, name="b"):
    return bert_classifier(tmp_path, hidden=hidden, layers=layers_, heads=4, ffn=64, vocab=50, name=name)[0]


def _ids(n=4, length=10, seed=0):
    return torch.randint(1, 50, (n, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# overparameterize / merge / save
# ----------------------------------------------------------------------------------------------
def test_overparameterize_then_merge_is_the_same_function(tmp_path):
    model = _bert(tmp_path)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    dense = sum(p.numel() for p in model.parameters())
    assert overparameterize(model, MPOConfig(n=3)) is model
    mpo = tensorize.mpo_modules(model)
    assert len(mpo) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    assert sum(p.numel() for p in model.parameters()) > dense  # over-parameterized
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - ref).abs().max()) < 1e-5
    merge(model)
    assert not tensorize.mpo_modules(model) and sum(p.numel() for p in model.parameters()) == dense
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - ref).abs().max()) < 1e-5


def test_overparameterize_with_a_teacher_aligns_shapes_and_the_constraint_matches_the_engine(tmp_path):
    teacher = _bert(tmp_path, layers_=4, hidden=48, name="t").eval()
    student = _bert(tmp_path, layers_=2, hidden=32, name="s")
    overparameterize(student, MPOConfig(n=3), teacher=teacher)
    tc = TensorConstraint(student, teacher)
    assert sum(len(p.cores) for p in tc.pairs) > 0
    # the engine's path (tdkd distill): the same teacher cores and loss
    t_cores, pairs = constraint.teacher_cores(student, teacher, layers.partner_fn(student, teacher))
    s_cores = {n: tensorize.layer_cores(m) for n, m in tensorize.mpo_modules(student).items()}
    expected = constraint.tensor_constraint_loss(s_cores, t_cores, pairs)
    value = tc()
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6) and float(value.detach()) > 0
    value.backward()
    assert all(s_cores[p.student][k].grad is not None for p in tc.pairs for k in p.cores)
    assert all(p.grad is None for p in teacher.parameters())
    assert list(tc.parameters()) == []  # the teacher cores are buffers, the student's parameters are not its own


def test_param_groups_split_cores_matrices_and_vectors(tmp_path):
    model = _bert(tmp_path)
    overparameterize(model, MPOConfig(n=3))
    groups = param_groups(model, lr=1e-3, mpo_lr=1e-4, weight_decay=0.01)
    by = {g["name"]: g for g in groups}
    cores = {id(c) for m in tensorize.mpo_modules(model).values() for c in tensorize.layer_cores(m)}
    assert {id(p) for p in by["cores"]["params"]} == cores and by["cores"]["lr"] == 1e-4
    assert by["cores"]["weight_decay"] == 0.0 and by["decay"]["weight_decay"] == 0.01
    assert all(p.ndim == 1 for p in by["no_decay"]["params"]) and by["no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # any torch optimizer takes them


def test_save_mpo_is_read_by_tdkd_merge_and_load_mpo(tmp_path, capsys):
    model = _bert(tmp_path)
    overparameterize(model, MPOConfig(n=3))
    ids = _ids()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_mpo(model, tmp_path / "mpo")
    again = load_mpo(tmp_path / "mpo")
    assert tensorize.mpo_modules(again)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref)
    rc, out, err = run_cli(["merge", str(tmp_path / "mpo"), "-o", str(tmp_path / "merged"), "--json"], capsys)
    assert rc == 0, err and json.loads(out)["ok"]
    with pytest.raises(TdkdError, match="exists"):
        save_mpo(model, tmp_path / "mpo")  # nothing overwritten without force


# ----------------------------------------------------------------------------------------------
# DistillLoss
# ----------------------------------------------------------------------------------------------
def test_distill_loss_equals_the_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 3, generator=g, requires_grad=True), torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    student, teacher = nn.Linear(3, 3), nn.Linear(3, 3)
    dl = DistillLoss(student, teacher, ["dist:weight=0.5"], kd=2.0, temperature=3.0, ce=0.25)
    value = dl(s, t, {"labels": labels})
    expected = (2.0 * losses.kd_loss(s, t, 3.0) + 0.25 * losses.ce_loss(s, labels)
                + 0.5 * method_losses.dist_loss(s, t, 1.0, 1.0, 1.0))
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert set(dl.parts) == {"kd", "ce", "dist"}
    value.backward()
    assert s.grad is not None


def test_distill_loss_owns_the_connectors_of_a_feature_method(tmp_path):
    teacher = _bert(tmp_path, layers_=2, hidden=48, name="t").eval()
    student = _bert(tmp_path, layers_=2, hidden=32, name="s")
    spec = "fitnet:weight=1,student=bert.pooler,teacher=bert.pooler"
    example = {"input_ids": _ids()}
    dl = DistillLoss(student, teacher, [spec], kd=0.0, example=example)
    assert [tuple(p.shape) for p in dl.connectors.parameters()] == [(48, 32), (48,)]
    s_logits = student(input_ids=example["input_ids"]).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=example["input_ids"]).logits
    dl(s_logits, t_logits, example).backward()
    assert all(p.grad is not None for p in dl.connectors.parameters())
    assert student.bert.pooler.dense.weight.grad is not None
    assert dl.param_groups(lr=1e-3)[0]["params"] == list(dl.connectors.parameters())
    dl.close()
    assert not student.bert.pooler._forward_hooks


# ----------------------------------------------------------------------------------------------
# API errors: one exception of tdkd's own type naming the argument
# ----------------------------------------------------------------------------------------------
def test_api_errors_name_the_argument(tmp_path):
    with pytest.raises(TdkdError, match=r"^model: no default target layers .*MPOConfig\(targets="):
        overparameterize(nn.Sequential(nn.ReLU()))
    with pytest.raises(TdkdError, match=r"^config: target pattern 'fc\*' matches no Linear or Conv2d"):
        overparameterize(nn.Sequential(nn.ReLU()), MPOConfig(targets=["fc*"]))
    with pytest.raises(TdkdError, match=r"^model: expected a torch.nn.Module"):
        overparameterize("bert-base")
    with pytest.raises(TdkdError, match=r"^config: n must be at least 2 and rank at least 1 \(got n=1"):
        overparameterize(nn.Sequential(nn.Linear(4, 4)), MPOConfig(n=1, targets=["0"]))
    student = _bert(tmp_path)
    stranger = nn.Sequential(nn.Conv2d(3, 8, 3))  # nothing in it pairs with BERT's Linear layers
    with pytest.raises(TdkdError, match=r"^teacher: none of its layers pairs"):
        overparameterize(student, MPOConfig(n=3), teacher=stranger)
    assert not tensorize.mpo_modules(student)  # left as it was
    with pytest.raises(TdkdError, match=r"^model: it was never over-parameterized"):
        merge(student)
    with pytest.raises(TdkdError, match=r"^student: not over-parameterized"):
        TensorConstraint(student, _bert(tmp_path, name="t2"))
    with pytest.raises(TdkdError, match=r"^methods: unknown method 'nope'"):
        DistillLoss(student, student, ["nope"])
    with pytest.raises(TdkdError, match=r"^example: feature methods need"):
        DistillLoss(student, student, ["sp:student=bert.pooler,teacher=bert.pooler"])


def test_the_package_root_loads_the_api_lazily():
    code = ("import sys, tdkd_cli\n"
            "assert 'torch' not in sys.modules\n"
            "tdkd_cli.overparameterize\n"
            "assert 'torch' in sys.modules\n"
            "print(sorted(set(tdkd_cli.API) - set(dir(tdkd_cli))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    with pytest.raises(AttributeError):
        tdkd_cli.not_a_name  # noqa: B018


# ----------------------------------------------------------------------------------------------
# Plug-ins
# ----------------------------------------------------------------------------------------------
def test_register_method_refuses_bad_and_taken_names():
    with pytest.raises(TdkdError, match="already a method"):
        plugins.register_method("kd")
    with pytest.raises(TdkdError, match="already a method"):
        plugins.register_method("dkd")
    with pytest.raises(TdkdError, match="lower-case"):
        plugins.register_method("Bad Name")
    with pytest.raises(TdkdError, match="kind must be"):
        plugins.register_method("fine", kind="graph")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    d = tmp_path_factory.mktemp("api-text")
    return d, sentiment_task(d), tiny_pair(d)


def test_a_plugin_loss_trains_in_tdkd_distill(text, capsys):
    d, task, teacher = text
    plugin = str(REPO / "examples" / "custom_loss.py")
    rc, out, err = run_cli(["methods", "--plugin", plugin, "--json"], capsys)
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["cosine"]["options"]["temperature"]["default"] == 1.0 and rows["feature-cosine"]["kind"] == "feature"
    run = d / "cosine"
    rc, out, err = run_cli(["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1",
                            "--max-steps", "3", "--log-every", "1", "--batch-size", "8", "--dev-limit", "16", "--n", "3",
                            "--plugin", plugin, "--method", "cosine:weight=2,temperature=2",
                            "--method", "feature-cosine:student=bert.pooler,teacher=bert.pooler", "-o", str(run)], capsys)
    assert rc == 0, err
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 3 and all(r["cosine"] > 0 and r["feature-cosine"] > 0 for r in recs)
    rc, out, err = run_cli(["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1",
                            "--plugin", str(d / "missing.py"), "-o", str(d / "x")], capsys)
    assert rc == 2 and "plug-in" in err and "no such file" in err and not (d / "x").exists()


def test_an_installed_package_offers_methods_through_entry_points(tmp_path):
    site = tmp_path / "site"
    (site / "mylosses-0.1.dist-info").mkdir(parents=True)
    (site / "mylosses-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mylosses\nVersion: 0.1\n")
    (site / "mylosses-0.1.dist-info" / "entry_points.txt").write_text("[tdkd.methods]\nl1 = mylosses\n")
    (site / "mylosses.py").write_text(
        "from tdkd_cli import register_method\n\n"
        "@register_method('l1-logits', paper='L1 between logits (entry-point plug-in)')\n"
        "def l1(s, t):\n    return (s - t).abs().mean()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "tdkd_cli", "methods", "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "l1-logits" in {r["name"] for r in json.loads(p.stdout)}


# ----------------------------------------------------------------------------------------------
# The examples, end to end
# ----------------------------------------------------------------------------------------------
def test_hf_trainer_example(tmp_path):
    import hf_trainer

    result = hf_trainer.main(["--out", str(tmp_path), "--steps", "8"])
    assert len(result["losses"]) == 8 and result["losses"][-1] < result["losses"][0]
    assert result["max_abs_diff"] < 1e-5  # plain transformers reload of the merged student == the MPO model


def test_timm_loop_example(tmp_path):
    import timm_loop

    r = timm_loop.main(["--out", str(tmp_path), "--steps", "60"])
    assert r["last_loss"] < r["first_loss"] and r["connectors"] == ["fitnet_0"]
    assert r["student_mpo_acc"] == r["reloaded_mpo_acc"] == r["merged_plain_timm_acc"] > 0.5
    assert (tmp_path / "student-mpo" / "tdkd.json").is_file()


# ----------------------------------------------------------------------------------------------
# The house: import contract, no private names across modules
# ----------------------------------------------------------------------------------------------
def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml")], capture_output=True, text=True,
                          cwd=root, env=env, timeout=300)


def test_the_import_contract_catches_a_wrong_way_import(tmp_path):
    shutil.copytree(REPO / "tdkd_cli", tmp_path / "tdkd_cli", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint_imports(tmp_path).returncode == 0
    mpo = tmp_path / "tdkd_cli" / "tensor" / "mpo.py"
    mpo.write_text(mpo.read_text() + "\nfrom ..engine import optim  # wrong way: the math reaching up into the engine\n")
    p = _lint_imports(tmp_path)
    assert p.returncode != 0 and "tdkd_cli.tensor.mpo -> tdkd_cli.engine.optim" in p.stdout


def test_no_private_name_is_imported_from_another_module():
    import ast

    offenders = []
    for path in (REPO / "tdkd_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("tdkd_cli")):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and path.name != "__init__.py":
                        offenders.append(f"{path.relative_to(REPO)}: {alias.name}")
    assert offenders == []

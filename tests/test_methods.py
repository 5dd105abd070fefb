"""Distillation methods (methods.py): each loss against a hand computation written out here with
plain Python loops, gradients reach the student only, specs parse or fail with one line, and every
method trains end to end on tiny text and ViT models, dense and MPO, with a result that merges."""

import json
import math

import pytest
import torch

from tdkd_cli import methods
from tdkd_cli.errors import UsageError

from .helpers import digits_folder, run_cli, sentiment_task, tiny_pair, tiny_vit_dir


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def _huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


S = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5], [-0.7, 0.9, 0.4, 0.0]]
T = [[2.0, 0.5, 1.0, -0.3], [0.0, 0.4, -0.5, 2.5], [0.3, 1.2, -0.4, 0.1]]
Y = [2, 3, 1]


def _grads(fn, *extra):
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T, requires_grad=True)
    loss = fn(s, t, *extra)
    loss.backward()
    assert float(s.grad.abs().sum()) > 0 and (t.grad is None or float(t.grad.abs().sum()) == 0)
    return float(loss.detach())


def test_dkd_equals_hand_computation():
    tau, alpha, beta = 2.0, 0.5, 3.0
    total = 0.0
    for s, t, y in zip(S, T, Y):
        ps, pt = _softmax(s, tau), _softmax(t, tau)
        tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        rest = [j for j in range(4) if j != y]
        qs, qt = _softmax([s[j] for j in rest], tau), _softmax([t[j] for j in rest], tau)
        total += alpha * tckd + beta * _kl(qt, qs)
    want = tau * tau * total / len(S)
    got = _grads(lambda s, t: methods.dkd_loss(s, t, torch.tensor(Y), alpha, beta, tau))
    assert got == pytest.approx(want, rel=1e-5)


def test_dist_equals_hand_computation():
    tau, beta, gamma = 1.5, 1.0, 2.0
    ps = [_softmax(r, tau) for r in S]
    pt = [_softmax(r, tau) for r in T]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ps, pt)) / len(S)
    cols = lambda m, j: [row[j] for row in m]  # noqa: E731
    intra = 1 - sum(_pearson(cols(ps, j), cols(pt, j)) for j in range(4)) / 4
    want = tau * tau * (beta * inter + gamma * intra)
    assert _grads(lambda s, t: methods.dist_loss(s, t, beta, gamma, tau)) == pytest.approx(want, rel=1e-5)


def test_sp_equals_hand_computation():
    b = len(S)
    s_feat = [r[:3] for r in S]  # the student is narrower than the teacher: relations still compare

    def gram(f):
        g = [[sum(x * y for x, y in zip(f[i], f[j])) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(s_feat), gram(T)
    want = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)
    got = _grads(lambda s, t: methods.sp_loss(s[:, :3], t))
    assert got == pytest.approx(want, rel=1e-5)


def test_rkd_equals_hand_computation():
    b, wd, wa = len(S), 2.0, 3.0

    def dist(f):
        d = [[math.dist(f[i], f[j]) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v] if n > 0 else [0.0] * len(v)

    def angle(f):  # [j][i][k] = <unit(f_i - f_j), unit(f_k - f_j)>
        e = [[unit([a - c for a, c in zip(f[i], f[j])]) for i in range(b)] for j in range(b)]
        return [[[sum(x * y for x, y in zip(e[j][i], e[j][k])) for k in range(b)] for i in range(b)] for j in range(b)]

    ds, dt = dist(S), dist(T)
    as_, at = angle(S), angle(T)
    d_loss = sum(_huber(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / b ** 2
    a_loss = sum(_huber(as_[j][i][k], at[j][i][k]) for i in range(b) for j in range(b) for k in range(b)) / b ** 3
    got = _grads(lambda s, t: methods.rkd_loss(s, t, wd, wa))
    assert got == pytest.approx(wd * d_loss + wa * a_loss, rel=1e-5)


def test_method_specs_parse_with_defaults():
    m, w, o = methods.parse("dkd:weight=0.5,beta=4")
    assert (m.name, w, o) == ("dkd", 0.5, {"alpha": 1.0, "beta": 4.0, "temperature": 4.0})
    m, w, o = methods.parse("sp:student=bert.pooler,teacher=bert.pooler")
    assert (m.name, w, o["student"], o["teacher"]) == ("sp", 1.0, "bert.pooler", "bert.pooler")
    (term, weight), = methods.terms(["dist:weight=2"])
    assert term.name == "dist" and weight == 2.0 and term.weight(None, True) == 2.0 and term.weight(None, False) == 0.0


@pytest.mark.parametrize("spec,says", [
    ("dkt", "unknown method 'dkt'"),
    ("dkd:weight=-1", "weight must be a finite number >= 0"),
    ("dkd:weight=nan", "weight must be a finite number >= 0"),
    ("dkd:beta=lots", "beta must be a number"),
    ("dkd:gamma=1", "expected option=value with an option of dkd"),
    ("dkd:temperature=0", "temperature must be positive"),
    ("sp:weight=1", "sp needs student=MODULE and teacher=MODULE"),
])
def test_bad_method_specs(spec, says):
    with pytest.raises(UsageError, match=says):
        methods.parse(spec)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods")
    return d, sentiment_task(d), tiny_pair(d)


SPECS = {"dkd": "dkd:weight=1,beta=2", "dist": "dist:weight=1",
         "sp": "sp:weight=10,student=bert.pooler,teacher=bert.pooler",
         "rkd": "rkd:weight=1,student=bert.encoder.layer.1,teacher=bert.encoder.layer.3"}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("mpo", [False, True])
def test_each_method_trains_a_text_student_dense_and_mpo(text, capsys, name, mpo):
    d, task, teacher = text
    run = d / f"{name}-{mpo}"
    args = ["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1", "--max-steps", "3",
            "--log-every", "1", "--batch-size", "8", "--device", "cpu", "--dev-limit", "16", "--n", "3", "--method", SPECS[name],
            "--mpo" if mpo else "--no-mpo", "-o", str(run)] + (["--tensor-lambda", "1"] if mpo else [])
    rc, out, err = run_cli(args, capsys)
    assert rc == 0, err
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 3 and all(r[name] > 0 and math.isfinite(r[name]) for r in recs)
    if mpo:
        assert all(r["tensor"] > 0 for r in recs)
        rc, out, err = run_cli(["merge", str(run / "best"), "-o", str(run / "merged")], capsys)
        assert rc == 0, err
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(str(run / "merged"))  # plain transformers reloads it


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods-vit")
    return d, digits_folder(d / "digits", count=120, dev_from=80), tiny_vit_dir(d / "vit")[1]


@pytest.mark.parametrize("spec", ["dkd:weight=1", "dist:weight=1", "sp:weight=10,student=blocks.0,teacher=blocks.1",
                                  "rkd:weight=1,student=norm,teacher=norm"])
def test_each_method_trains_a_vit_student_mpo(vit, capsys, spec):
    d, folder, teacher = vit
    name = spec.split(":")[0]
    run = d / name
    rc, out, err = run_cli(["distill", "--teacher", str(teacher), "--student-layers", "1", "--data", str(folder), "--n", "3",
                            "--tensor-lambda", "1e-2", "--batch-size", "8", "--max-steps", "2", "--log-every", "1",
                            "--device", "cpu", "--method", spec, "-o", str(run)], capsys)
    assert rc == 0, err
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 2 and all(r[name] > 0 and math.isfinite(r[name]) for r in recs)
    assert recs[-1]["tensor"] > 0  # the cut student starts at its partner layer: 0 at step 1, then apart
    rc, out, err = run_cli(["merge", str(run / "best"), "-o", str(run / "merged")], capsys)
    assert rc == 0, err
    import timm
    from safetensors.torch import load_file

    cfg = json.loads((run / "merged" / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"])
    model.load_state_dict(load_file(str(run / "merged" / "model.safetensors")))  # plain timm reloads it


def test_method_bad_input_on_the_command_line(text, capsys):
    d, task, teacher = text
    base = ["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1", "--max-steps", "1",
            "--device", "cpu", "--json"]
    for extra, says in ([["--method", "nope"], "unknown method 'nope'"],
                        [["--method", "dkd:weight=-2"], "weight must be a finite number >= 0"],
                        [["--method", "sp:student=bert.nothing,teacher=bert.pooler"], "student has no module 'bert.nothing'"]):
        out_dir = d / "bad"
        rc, out, err = run_cli(base + extra + ["-o", str(out_dir)], capsys)
        assert rc == 2 and says in err and err.count("\n") == 1 and not out_dir.exists(), err
    rc, out, err = run_cli(["distill", "--data", str(task), "--teacher", "none", "--student", str(teacher),
                            "--method", "dkd", "-o", str(d / "bad")], capsys)
    assert rc == 2 and "methods need a teacher" in err

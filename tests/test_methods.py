"""Distillation methods (methods.py): each loss against a hand computation written out here with
plain Python loops, gradients reach the student only, specs parse or fail with one line, and every
method trains end to end on tiny text and ViT models, dense and MPO, with a result that merges."""

import json
import math

import pytest
import torch

from tdkd_cli.methods import binding, method_losses as ml, registry as methods
from tdkd_cli.core.errors import UsageError

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
    got = _grads(lambda s, t: ml.dkd_loss(s, t, torch.tensor(Y), alpha, beta, tau))
    assert got == pytest.approx(want, rel=1e-5)


def test_dist_equals_hand_computation():
    tau, beta, gamma = 1.5, 1.0, 2.0
    ps = [_softmax(r, tau) for r in S]
    pt = [_softmax(r, tau) for r in T]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ps, pt)) / len(S)
    cols = lambda m, j: [row[j] for row in m]  # noqa: E731
    intra = 1 - sum(_pearson(cols(ps, j), cols(pt, j)) for j in range(4)) / 4
    want = tau * tau * (beta * inter + gamma * intra)
    assert _grads(lambda s, t: ml.dist_loss(s, t, beta, gamma, tau)) == pytest.approx(want, rel=1e-5)


def test_sp_equals_hand_computation():
    b = len(S)
    s_feat = [r[:3] for r in S]  # the student is narrower than the teacher: relations still compare

    def gram(f):
        g = [[sum(x * y for x, y in zip(f[i], f[j])) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(s_feat), gram(T)
    want = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)
    got = _grads(lambda s, t: ml.sp_loss(s[:, :3], t))
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
    got = _grads(lambda s, t: ml.rkd_loss(s, t, wd, wa))
    assert got == pytest.approx(wd * d_loss + wa * a_loss, rel=1e-5)


# token features (batch 2, tokens 3, width 2): a fixed, hand-checkable example
FS = [[[0.5, -1.0], [2.0, 0.0], [0.1, 0.3]], [[-0.4, 0.8], [1.0, 1.0], [0.0, -2.0]]]
FT = [[[1.0, 0.0], [1.5, -0.5], [0.2, 0.2]], [[0.0, 1.0], [0.5, 2.0], [-1.0, -1.0]]]
MASK = [[1, 1, 0], [1, 1, 1]]


def _grads3(fn, s_list=FS, t_list=FT):
    s = torch.tensor(s_list, requires_grad=True)
    t = torch.tensor(t_list, requires_grad=True)
    loss = fn(s, t)
    loss.backward()
    assert float(s.grad.abs().sum()) > 0 and (t.grad is None or float(t.grad.abs().sum()) == 0)
    return float(loss.detach())


def test_fitnet_equals_hand_computation_with_and_without_the_token_mask():
    sq = [(a - b) ** 2 for sb, tb in zip(FS, FT) for sr, tr in zip(sb, tb) for a, b in zip(sr, tr)]
    assert _grads3(lambda s, t: ml.fitnet_loss(s, t)) == pytest.approx(sum(sq) / len(sq), rel=1e-6)
    kept = [(a - b) ** 2 for sb, tb, mb in zip(FS, FT, MASK) for sr, tr, m in zip(sb, tb, mb) if m for a, b in zip(sr, tr)]
    got = _grads3(lambda s, t: ml.fitnet_loss(s, t, torch.tensor(MASK)))
    assert got == pytest.approx(sum(kept) / len(kept), rel=1e-6)


def test_fitnet_connector_gets_gradients_teacher_none():
    from tdkd_cli.methods.registry import METHODS

    m = METHODS["fitnet"]
    conn = m.connector((2, 3, 2), (2, 3, 4))
    assert isinstance(conn, torch.nn.Linear) and (conn.in_features, conn.out_features) == (2, 4)
    s = torch.tensor(FS, requires_grad=True)
    t = torch.randn(2, 3, 4, requires_grad=True)
    loss = m.compute([s], [t], {}, {}, conn)
    loss.backward()
    assert float(conn.weight.grad.abs().sum()) > 0 and float(s.grad.abs().sum()) > 0 and t.grad is None
    with torch.no_grad():
        want = sum((float(v) - float(w)) ** 2 for v, w in zip(conn(torch.tensor(FS)).flatten(), t.flatten())) / 24
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    conv = m.connector((2, 3, 4, 4), (2, 5, 4, 4))
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 5


def test_at_equals_hand_computation_for_tokens_and_feature_maps():
    def at(f_tokens):  # per example: q_j = sum_c F_jc^2 over channels, then unit L2 norm
        out = []
        for ex in f_tokens:
            q = [sum(c * c for c in tok) for tok in ex]
            n = math.sqrt(sum(v * v for v in q))
            out.append([v / n for v in q])
        return out

    a_s, a_t = at(FS), at(FT)
    want = sum(sum((x - y) ** 2 for x, y in zip(rs, rt)) for rs, rt in zip(a_s, a_t)) / len(FS)
    assert _grads3(lambda s, t: ml.at_loss(s, t)) == pytest.approx(want, rel=1e-6)
    # the same numbers as (batch, channels, 1, positions) feature maps give the same loss
    maps = lambda f: [[[[tok[c] for tok in ex]] for c in range(2)] for ex in f]  # noqa: E731
    assert _grads3(lambda s, t: ml.at_loss(s, t), maps(FS), maps(FT)) == pytest.approx(want, rel=1e-6)


def test_relation_kl_equals_hand_computation():
    """MiniLM relations with 2 heads of width 1 over 3 tokens, the student's first example masked at token 3."""
    def rel_logp(a, b, h, mask_row):
        rows = []
        for i in range(3):
            logits = [a[i][h] * b[j][h] / math.sqrt(1) for j in range(3)]
            keep = [j for j in range(3) if mask_row[j]]
            z = math.log(sum(math.exp(logits[j]) for j in keep))
            rows.append({j: logits[j] - z for j in keep})
        return rows

    total, count = 0.0, 0
    for ex in range(2):
        for h in range(2):
            ls = rel_logp(FS[ex], FS[ex], h, MASK[ex])
            lt = rel_logp(FT[ex], FT[ex], h, MASK[ex])
            for i in range(3):
                if MASK[ex][i]:
                    total += sum(math.exp(lt[i][j]) * (lt[i][j] - ls[i][j]) for j in lt[i])
                    count += 1
    got = _grads3(lambda s, t: ml.relation_kl((s, s), (t, t), (2, 2), torch.tensor(MASK)))
    assert got == pytest.approx(total / count, rel=1e-5)


def test_cc_equals_hand_computation():
    gamma, order = 0.4, 2
    b = len(S)

    def corr(f):
        u = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in f]
        out = []
        for i in range(b):
            out.append([])
            for j in range(b):
                dot = sum(x * y for x, y in zip(u[i], u[j]))
                out[-1].append(sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot ** p for p in range(order + 1)))
        return out

    cs, ct = corr([r[:3] for r in S]), corr(T)
    want = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2
    assert _grads(lambda s, t: ml.cc_loss(s[:, :3], t, gamma, order)) == pytest.approx(want, rel=1e-5)


def test_layer_map_pairs_and_plus_pairs():
    spec = methods.parse("fitnet:student=a.*+pool,teacher=b.*+pool")
    s_names, t_names = ["a", "a.0", "a.0.fc", "a.1", "pool"], ["b", "b.0", "b.1", "b.2", "b.3", "b.3.fc", "pool"]
    assert binding.expand_pairs(spec, [0, 2], s_names, t_names) == [("a.0", "b.0"), ("a.1", "b.2"), ("pool", "pool")]
    # no layer stack (CNN stages): the uniform map over the numbers found, ResNet-style names too
    assert binding.expand_pairs(spec, None, s_names, t_names) == [("a.0", "b.1"), ("a.1", "b.3"), ("pool", "pool")]
    stages = methods.parse("at:student=layer*,teacher=layer*")
    assert binding.expand_pairs(stages, None, ["layer1", "layer1.0", "layer2"], ["layer1", "layer2", "layer3", "layer4"]) == \
        [("layer1", "layer2"), ("layer2", "layer4")]
    with pytest.raises(UsageError, match="no student module matches 'a.\\*'"):
        binding.expand_pairs(spec, [0, 2], [], t_names)
    with pytest.raises(UsageError, match="must name the same number of modules"):
        binding.expand_pairs(methods.parse("at:student=a+b,teacher=c"), [0])
    with pytest.raises(UsageError, match="'\\*' must appear in both paths"):
        binding.expand_pairs(methods.parse("at:student=a.*,teacher=c"), [0])


def test_method_specs_parse_with_defaults():
    spec = methods.parse("dkd:weight=0.5,beta=4")
    assert (spec.method.name, spec.weight, spec.options) == ("dkd", 0.5, {"alpha": 1.0, "beta": 4.0, "temperature": 4.0})
    spec = methods.parse("sp:student=bert.pooler,teacher=bert.pooler")
    assert (spec.method.name, spec.weight, spec.options["student"], spec.options["teacher"]) == ("sp", 1.0, "bert.pooler", "bert.pooler")
    (term, weight), = binding.bind(["dist:weight=2"], None, None, None, probe=None).terms
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
         "fitnet": "fitnet:weight=1,student=bert.encoder.layer.*,teacher=bert.encoder.layer.*",
         "at": "at:weight=1000,student=bert.encoder.layer.1,teacher=bert.encoder.layer.3",
         "minilm": "minilm:weight=1,student=bert.encoder.layer.*.attention.self,teacher=bert.encoder.layer.*.attention.self",
         "sp": "sp:weight=10,student=bert.pooler,teacher=bert.pooler",
         "rkd": "rkd:weight=1,student=bert.encoder.layer.1,teacher=bert.encoder.layer.3",
         "cc": "cc:weight=10,student=bert.pooler+bert.encoder.layer.1,teacher=bert.pooler+bert.encoder.layer.3"}


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
                                  "rkd:weight=1,student=norm,teacher=norm", "fitnet:weight=1,student=blocks.*,teacher=blocks.*",
                                  "at:weight=100,student=blocks.0,teacher=blocks.1", "minilm:student=blocks.0.attn,teacher=blocks.1.attn",
                                  "cc:weight=10,student=norm,teacher=norm"])
@pytest.mark.parametrize("mpo", [False, True])
def test_each_method_trains_a_vit_student_dense_and_mpo(vit, capsys, spec, mpo):
    d, folder, teacher = vit
    name = spec.split(":")[0]
    run = d / f"{name}-{mpo}"
    rc, out, err = run_cli(["distill", "--teacher", str(teacher), "--student-layers", "1", "--data", str(folder), "--n", "3",
                            "--batch-size", "8", "--max-steps", "2", "--log-every", "1", "--device", "cpu", "--method", spec,
                            "-o", str(run)] + (["--mpo", "--tensor-lambda", "1e-2"] if mpo else ["--no-mpo"]), capsys)
    assert rc == 0, err
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 2 and all(r[name] > 0 and math.isfinite(r[name]) for r in recs)
    if not mpo:
        return
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


# ---------------------------------------------------------------------------------------------
# connectors: a narrower student (width 16 vs 32) needs one per FitNets pair
def _state(run, step):
    from safetensors.torch import load_file

    cdir = run / "checkpoints" / f"step-{step:07d}"
    return load_file(str(cdir / "model.safetensors")), load_file(str(cdir / "trainer_state.safetensors"))


def test_fitnet_connectors_train_resume_bitwise_and_drop_at_merge(text, capsys):
    d, task, teacher = text
    narrow = tiny_pair(d / "narrow", hidden=16, teacher_layers=2, heads=2, ffn=32, name="narrow")
    spec = "fitnet:weight=1,student=bert.encoder.layer.*,teacher=bert.encoder.layer.*"

    def distill(run, *extra):
        return run_cli(["distill", "--data", str(task), "--teacher", str(teacher), "--student", str(narrow), "--no-mpo",
                        "--batch-size", "8", "--device", "cpu", "--dev-limit", "16", "--method", spec, "--log-every", "1",
                        "--save-every", "1", "--keep-last", "9", "-o", str(run), *extra], capsys)

    rc, out, err = distill(d / "fit-full", "--max-steps", "4", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["connectors"] == ["fitnet.0: Linear 16 -> 32 from bert.encoder.layer.0 to bert.encoder.layer.1",
                                    "fitnet.1: Linear 16 -> 32 from bert.encoder.layer.1 to bert.encoder.layer.3"]
    model, state = _state(d / "fit-full", 4)
    assert state["fitnet.0.weight"].shape == (32, 16) and state["fitnet.1.bias"].shape == (32,)
    assert not [k for k in model if k.startswith("fitnet")]  # the model file holds the student only
    # resumed from its step-2 checkpoint, the run ends bitwise where the straight run did, connectors included
    import shutil

    shutil.copytree(d / "fit-full", d / "fit-half")
    for step in (3, 4):
        shutil.rmtree(d / "fit-half" / "checkpoints" / f"step-{step:07d}")
    rc, _, err = distill(d / "fit-half", "--max-steps", "4", "--resume")
    assert rc == 0, err
    model2, state2 = _state(d / "fit-half", 4)
    for k in model:
        assert torch.equal(model[k], model2[k]), k
    for k in ("fitnet.0.weight", "fitnet.0.bias", "fitnet.1.weight", "fitnet.1.bias"):
        assert torch.equal(state[k], state2[k]), k
    # the merged student is the plain architecture
    rc, _, err = run_cli(["merge", str(d / "fit-full" / "best"), "-o", str(d / "fit-merged")], capsys)
    assert rc == 0, err
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(str(d / "fit-merged"))
    assert merged.config.hidden_size == 16
    # connector_lr: a tiny rate all but freezes the connectors while the student still moves
    rc, _, err = distill(d / "fit-slow", "--max-steps", "2", "--connector-lr", "1e-12")
    assert rc == 0, err
    (m1, s1), (m2, s2) = _state(d / "fit-slow", 1), _state(d / "fit-slow", 2)
    assert float((s2["fitnet.0.weight"] - s1["fitnet.0.weight"]).abs().max()) < 1e-9
    assert float((m2["bert.encoder.layer.0.output.dense.weight"] - m1["bert.encoder.layer.0.output.dense.weight"]).abs().max()) > 1e-7
    (f1, g1), (f2, g2) = _state(d / "fit-full", 1), _state(d / "fit-full", 2)
    assert float((g2["fitnet.0.weight"] - g1["fitnet.0.weight"]).abs().max()) > 1e-7


def test_feature_method_bad_input(text, vit, capsys):
    d, task, teacher = text
    narrow = tiny_pair(d / "narrow2", hidden=16, teacher_layers=2, heads=2, ffn=32, name="narrow")
    capsys.readouterr()
    base = ["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1", "--max-steps", "1",
            "--device", "cpu", "--json"]
    cases = [
        (["--method", "at:student=bert.pooler,teacher=bert.pooler"],
         "cannot compare student bert.pooler [32, 32] with teacher bert.pooler [32, 32]: attention transfer needs token features"),
        (["--method", "fitnet:student=bert.pooler,teacher=bert.encoder.layer.1"],
         "cannot compare student bert.pooler [32, 32] with teacher bert.encoder.layer.1"),
        (["--method", "minilm:student=bert.pooler,teacher=bert.pooler"], "has no query/key/value or qkv projections"),
        (["--method", "cc:student=a+b,teacher=c"], "must name the same number of modules"),
        (["--method", "at:student=blocks.*,teacher=blocks.*"], "no student module matches 'blocks.*'"),  # a ViT path on BERT
        (["--method", "cc:weight=x,student=bert.pooler,teacher=bert.pooler"], "weight must be a number"),
        (["--student", str(narrow), "--method",
          "minilm:student=bert.encoder.layer.0.attention.self,teacher=bert.encoder.layer.0.attention.self"],
         "their head counts differ (2 and 4); set heads=H"),
        (["--method", "minilm:heads=3,student=bert.encoder.layer.0.attention.self,teacher=bert.encoder.layer.0.attention.self"],
         "widths 32 and 32 do not split into 3 heads"),
    ]
    for extra, says in cases:
        out_dir = d / "bad-feature"
        args = base + extra + ["-o", str(out_dir)]
        if "--student" in extra:
            args.remove("--student-layers"), args.remove("0,1")
        rc, out, err = run_cli(args, capsys)
        assert rc == 2 and says in err and err.count("\n") == 1 and not out_dir.exists(), (extra, err)


def test_builtin_digits_is_an_image_folder_of_the_real_set(tmp_path, monkeypatch):
    from tdkd_cli.io import data

    monkeypatch.setenv("TDKD_CACHE", str(tmp_path))
    path, task = data.resolve_data("builtin:digits")
    assert task is None and path == tmp_path / "digits-v1"
    train, dev = list((path / "train").rglob("*.png")), list((path / "dev").rglob("*.png"))
    assert (len(train), len(dev)) == (1437, 360)  # 1,797 images, every fifth in dev
    assert sorted(p.name for p in (path / "dev").iterdir()) == [str(c) for c in range(10)]
    assert data.resolve_data("builtin:digits")[0] == path  # made once


@pytest.mark.parametrize("recipe", ["sst2-response", "sst2-feature", "sst2-relation",
                                    "digits-response", "digits-feature", "digits-relation"])
def test_shipped_method_recipes_run(text, vit, capsys, recipe):
    """Each shipped per-kind recipe trains (2 steps) with a tiny teacher of its modality."""
    teacher = text[2] if recipe.startswith("sst2") else vit[2]
    run = text[0] / f"recipe-{recipe}"
    student = ["--student", str(teacher)] if recipe.startswith("sst2") else []  # as the demo's --student student-mpo
    rc, out, err = run_cli(["distill", "--recipe", recipe, "--teacher", str(teacher), *student, "--max-steps", "2",
                            "--batch-size", "8", "--dev-limit", "16", "--device", "cpu", "--log-every", "1", "-o", str(run)], capsys)
    assert rc == 0, err
    from tdkd_cli.core import recipe as recipe_mod

    (method,) = recipe_mod.read(recipe)["methods"]
    name = method.split(":")[0]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 2 and all(r[name] > 0 for r in recs) and all(r["tensor"] >= 0 for r in recs)


def test_feature_maps_of_timm_cnns_dense(vit, capsys):
    """ResNets (dense students): AT on the feature maps of every stage (layer1..layer4 paired by "*"), FitNets with a 1x1 Conv2d connector
    (resnet10t's 128 channels to resnet26's 512 at the same height and width)."""
    d, folder, _ = vit
    run = d / "cnn"
    rc, out, err = run_cli(["distill", "--teacher", "resnet26", "--student", "resnet10t", "--init", "random", "--no-mpo",
                            "--data", str(folder), "--max-steps", "2", "--batch-size", "4", "--log-every", "1",
                            "--device", "cpu", "--json", "--method", "at:weight=100,student=layer*,teacher=layer*",
                            "--method", "fitnet:student=layer2,teacher=layer2", "-o", str(run)], capsys)
    assert rc == 0, err
    assert json.loads(out)["connectors"] == ["fitnet.0: 1x1 Conv2d 128 -> 512 from layer2 to layer2"]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 2 and all(r["at"] > 0 and r["fitnet"] > 0 for r in recs)

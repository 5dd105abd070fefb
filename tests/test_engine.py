"""The training engine's pieces: the recipe schema behind the distill options, loss terms as data,
features by module path, and the progress object a checkpoint stores."""

import math

import click
import pytest
import torch
import typer

from tdkd_cli.methods import loss_terms
from tdkd_cli.core import recipe
from tdkd_cli.cli.app import app
from tdkd_cli.core.errors import UsageError
from tdkd_cli.methods.features import FeatureTap
from tdkd_cli.engine.train import Progress

NOT_RECIPE = {"ctx", "output", "recipe", "resume", "force", "as_json", "plugins"}
FLAG_EXCEPTIONS = {"text_columns": "--text-column", "methods": "--method"}  # one column per flag, repeatable


def _distill_command() -> click.Command:
    return typer.main.get_command(app).commands["distill"]


def test_distill_options_are_the_recipe_keys():
    params = {p.name: p for p in _distill_command().params}
    keys = set(recipe.SCHEMA) - {"description"}
    assert set(params) - NOT_RECIPE == keys
    for key in keys:
        p = params[key]
        kind, default, text = recipe.SCHEMA[key]
        assert FLAG_EXCEPTIONS.get(key, "--" + key.replace("_", "-")) in p.opts + p.secondary_opts, key
        assert p.default is None, key  # unset options never override the recipe
        assert p.help.startswith(text), key  # the help is the schema's
        if default is not None and kind != "bool":
            assert p.help.endswith(f"[{default}]"), key
        assert p.multiple == (kind == "list"), key


def test_recipe_is_typed_and_frozen(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("lr: 1e-4\ntargets: ['*query']\nteacher: none\n")
    r, explicit = recipe.build(str(f), {"batch_size": 8, "seed": None})
    assert r.lr == 1e-4 and r.batch_size == 8 and r.targets == ("*query",) and r.n == 5
    assert explicit == {"lr", "targets", "teacher", "batch_size"}
    with pytest.raises(Exception):
        r.lr = 3.0
    # recipe.yaml round trip: lists stay lists, every key in schema order
    again = recipe.Recipe.from_dict(recipe.resolve(None, {}) | recipe.validate(__import__("yaml").safe_load(recipe.dump(r)), "x"))
    assert again == r and list(r.as_dict()) == list(recipe.SCHEMA)


def test_resume_refuses_a_changed_key_and_takes_a_resumable_one():
    stored = recipe.Recipe(teacher="none", data="d", lr=1e-4).as_dict()
    given = recipe.Recipe(teacher="none", data="d", lr=2e-4, log_every=3)
    with pytest.raises(UsageError, match="lr differs"):
        recipe.for_resume(stored, given, {"lr"}, "run/recipe.yaml")
    r = recipe.for_resume(stored, given, {"log_every"}, "run/recipe.yaml")
    assert r.lr == 1e-4 and r.log_every == 3


def test_optimizer_and_schedule_keys_and_the_graph_defaults():
    from tdkd_cli.engine import optim

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    r = recipe.Recipe(teacher="none", data="d", optimizer="adam", weight_decay=0.1, lr=0.01)
    opt, _ = optim.setup(model, {}, r)
    assert type(opt) is torch.optim.Adam  # L2 in the gradient: a zero gradient still moves the weights
    w = model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert not torch.equal(model[0].weight, w) and torch.equal(model[0].bias.grad, torch.zeros(4))
    assert type(optim.setup(model, {}, recipe.Recipe(teacher="none", data="d"))[0]) is torch.optim.AdamW
    assert [optim.lr_factor(k, 10, 2, "constant") for k in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert [optim.lr_factor(k, 10, 0, "linear") for k in (0, 5, 10)] == [1.0, 0.5, 0.0]
    g = recipe.with_graph_defaults(recipe.Recipe(teacher="none", data="builtin:cora", weight_decay=0.0), {"weight_decay"}, False)
    assert (g.optimizer, g.lr_schedule, g.max_grad_norm, g.weight_decay, g.lr) == ("adam", "constant", 0.0, 0.0, 0.01)
    alone = recipe.with_graph_defaults(recipe.Recipe(teacher="none", data="builtin:cora"), set(), False)
    taught = recipe.with_graph_defaults(recipe.Recipe(teacher="t", data="builtin:cora"), set(), True)
    assert (alone.weight_decay, alone.mpo, taught.weight_decay, taught.mpo) == (5e-4, False, 0.0, True)
    with pytest.raises(UsageError, match="optimizer must be adamw or adam"):
        recipe.check_ranges(recipe.Recipe(teacher="none", data="d", optimizer="sgd"))


def test_active_terms_and_weights_follow_the_recipe():
    names = lambda r, t: [(term.name, w) for term, w in loss_terms.active(r, t)]  # noqa: E731
    assert names(recipe.Recipe(), False) == [("ce", 1.0)]
    assert names(recipe.Recipe(alpha=0.25, hidden_weight=2.0, tensor_lambda=1e-3), True) == [
        ("kd", 0.25), ("ce", 0.75), ("hidden", 2.0), ("tensor", 1e-3)]
    assert names(recipe.Recipe(alpha=1.0), True) == [("kd", 1.0)]
    assert loss_terms.LOG_KEYS == ("loss", "kd", "ce", "hidden", "attention", "tensor", "grad_norm")
    active = loss_terms.active(recipe.Recipe(attention_weight=1.0, tensor_lambda=1.0), True)
    assert loss_terms.needs(active) == {"teacher", "attentions"}
    assert [t.name for t, _ in active if t.per_step] == ["tensor"]


def test_weighted_terms_equal_the_hand_written_loss():
    torch.manual_seed(0)
    s = loss_terms.Outputs(torch.randn(4, 3, requires_grad=True))
    t = loss_terms.Outputs(torch.randn(4, 3))
    labels = torch.tensor([0, 2, 1, 2])
    r = recipe.Recipe(alpha=0.4, temperature=2.0)
    ctx = loss_terms.Context(temperature=r.temperature)
    total = sum(w * term.compute(s, t, {"labels": labels}, ctx) for term, w in loss_terms.active(r, True))
    # by hand: 0.4 * T^2 * mean_b sum_c p_t (log p_t - log p_s) + 0.6 * mean_b -log softmax(z_s)[y]
    T = 2.0
    ps, pt = torch.softmax(s.logits / T, -1), torch.softmax(t.logits / T, -1)
    kd = T * T * (pt * (pt.log() - ps.log())).sum(-1).mean()
    ce = -torch.log_softmax(s.logits, -1)[torch.arange(4), labels].mean()
    assert float(total.detach()) == pytest.approx(float(0.4 * kd.detach() + 0.6 * ce.detach()), rel=1e-6)
    total.backward()
    assert float(s.logits.grad.abs().sum()) > 0


def test_feature_tap_reads_any_module_and_leaves_no_hooks(tmp_path):
    from .helpers import bert_classifier

    model, _ = bert_classifier(tmp_path, hidden=32, layers=2, heads=2, ffn=64, vocab=50)
    ids = torch.randint(1, 50, (2, 7))
    paths = ["bert.encoder.layer.0", "bert.encoder.layer.1.output.dense"]
    hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731  (transformers keeps its own)
    model(input_ids=ids, output_hidden_states=True)  # transformers installs its output-recording hooks on first use
    before = hooks()
    with FeatureTap(model, paths) as tap:
        out = model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(tap.features["bert.encoder.layer.0"], out.hidden_states[1])
        assert tap.features["bert.encoder.layer.1.output.dense"].shape == (2, 7, 32)
        assert hooks() == before + 2
    assert hooks() == before
    with pytest.raises(UsageError, match="no module 'bert.encoder.layer.9'"):
        FeatureTap(model, ["bert.encoder.layer.9"], "student")


def test_feature_tap_on_a_timm_model():
    import timm

    from .helpers import VIT_ARGS

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **VIT_ARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureTap(model, ["blocks.1", "norm"]) as tap:
        y = model(x)
        feats = dict(tap.features)
    assert feats["blocks.1"].shape == (2, 17, 48)
    # the head reads the normed class token: the tapped 'norm' output feeds the logits
    assert torch.allclose(model.head(feats["norm"][:, 0]), y, atol=1e-6)


def test_progress_round_trips_through_its_state_dict():
    p = Progress(seed=3, world_size=1, total_steps=40, steps_per_epoch=8, metric="accuracy")
    p.step = 10
    assert p.record_eval({"accuracy": 0.5}, "accuracy") and not p.record_eval({"accuracy": 0.4}, "accuracy")
    p.step = 12
    assert p.record_eval({"accuracy": 0.75}, "accuracy")
    state = p.state_dict()
    assert (state["step"], state["epoch"], state["best"]) == (12, 1, {"metric": "accuracy", "value": 0.75, "step": 12})
    assert state["seed"] == 3 and state["timed_steps"] == 12 and state["last_eval"] == {"accuracy": 0.75}
    q = Progress(seed=3, world_size=1, total_steps=40, steps_per_epoch=8, metric="accuracy")
    q.load_state_dict(state)
    q.start_clock()
    q.step = 14
    assert q.best == p.best and q.timed_steps() == 14 and q.train_seconds() >= state["train_seconds"]
    assert math.isfinite(q.train_seconds())


def test_a_registered_term_reads_features_by_module_path(tmp_path, capsys, monkeypatch):
    """A term added to the registry gets the outputs of the modules it names (forward hooks on the
    student and the teacher), is weighted into the loss, and is logged under its own name."""
    import json

    from tdkd_cli.methods import features

    from .helpers import run_cli, sentiment_task, tiny_pair

    task, teacher = sentiment_task(tmp_path), tiny_pair(tmp_path)
    seen = []

    def probe(s, t, batch, ctx):
        a, b = s.features["bert.encoder.layer.0"], t.features["bert.encoder.layer.3"]
        seen.append((tuple(a.shape), a.requires_grad, b.requires_grad))
        return torch.nn.functional.mse_loss(a, b)

    term = loss_terms.Term("probe", "test: layer-0 output of the student vs layer 3 of the teacher",
                           lambda r, has_teacher: 0.5, probe, frozenset({"teacher"}),
                           modules=lambda r: (["bert.encoder.layer.0"], ["bert.encoder.layer.3"]))
    monkeypatch.setitem(loss_terms.TERMS, "probe", term)
    closed = []
    monkeypatch.setattr(features.FeatureTap, "close", lambda self, real=features.FeatureTap.close: closed.append(1) or real(self))
    args = ["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1", "--no-mpo",
            "--max-steps", "3", "--log-every", "1", "--dev-split", "none", "--batch-size", "8", "--device", "cpu"]
    rc, out, err = run_cli(args + ["-o", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["probe"] > 0 for r in recs)
    # weighted into the total: loss = kd + 0.5 * probe (alpha 1: no CE)
    assert all(r["loss"] == pytest.approx(r["kd"] + 0.5 * r["probe"], rel=1e-4) for r in recs)
    assert seen and all(shape[-1] == 32 and s_grad and not t_grad for shape, s_grad, t_grad in seen)
    assert len(closed) == 2  # both taps removed when training ended

    bad = loss_terms.Term("probe", "", lambda r, t: 1.0, probe, modules=lambda r: (["bert.encoder.layer.7"], []))
    monkeypatch.setitem(loss_terms.TERMS, "probe", bad)
    rc, out, err = run_cli(args + ["-o", str(tmp_path / "run2")], capsys)
    assert rc == 2 and "student has no module 'bert.encoder.layer.7'" in err and not (tmp_path / "run2").exists()

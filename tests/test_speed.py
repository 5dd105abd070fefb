"""Teacher-output cache and mixed precision (`tdkd distill --teacher-cache`, `--precision`)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdkd_cli.methods import loss_terms
from tdkd_cli.methods.loss_terms import Outputs
from tdkd_cli.engine.teacher_cache import TeacherCache

from .helpers import digits_folder, run_cli, sentiment_task, tiny_pair


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    d = tmp_path_factory.mktemp("speed")
    return d, tiny_pair(d, dropout=0.0)


@pytest.fixture
def teacher_forwards(monkeypatch):
    """Counts forward passes of models in eval mode during training (the frozen teacher's)."""
    calls = {"teacher": 0}
    real = loss_terms.forward

    def counting(model, family, batch, needs=frozenset()):
        if not model.training:
            calls["teacher"] += 1
        return real(model, family, batch, needs)

    monkeypatch.setattr(loss_terms, "forward", counting)
    return calls


def _distill(task, teacher, run, capsys, *extra):
    return run_cli(["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1", "--mpo",
                    "--batch-size", "16", "--device", "cpu", "--log-every", "1", "--max-length", "16",
                    "-o", str(run), *extra], capsys)


def _tensors(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def _cache_files():
    return sorted((Path(os.environ["TDKD_CACHE"]) / "teacher-outputs").glob("*.safetensors"))


def test_cached_run_equals_uncached_run_bitwise_when_batches_repeat(text, capsys, teacher_forwards):
    """16 examples, batch 16: every epoch is the same batch (rows permuted), so cached logits are
    bitwise those the teacher would give again; the run skips the teacher after epoch 1."""
    d, teacher = text
    task = sentiment_task(d / "one-batch", n_train=16, n_dev=8, seed=3)
    rc, _, err = _distill(task, teacher, d / "plain", capsys, "--epochs", "3", "--no-teacher-cache")
    assert rc == 0, err
    assert "teacher cache: off (teacher_cache: false)" in err and teacher_forwards["teacher"] == 3
    teacher_forwards["teacher"] = 0
    rc, _, err = _distill(task, teacher, d / "cached", capsys, "--epochs", "3")
    assert rc == 0, err
    assert "teacher cache: on, 0 of 16 examples cached" in err
    assert teacher_forwards["teacher"] == 1  # epoch 1 only
    a, b = _tensors(d / "plain", 3), _tensors(d / "cached", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a second run with the same teacher, inputs and batch plan starts from the stored outputs
    teacher_forwards["teacher"] = 0
    rc, _, err = _distill(task, teacher, d / "cached2", capsys, "--epochs", "3")
    assert rc == 0 and "teacher cache: on, 16 of 16 examples cached" in err and teacher_forwards["teacher"] == 0
    c = _tensors(d / "cached2", 3)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_cache_holds_each_examples_teacher_logits_and_is_keyed_by_inputs(text, capsys, teacher_forwards):
    from transformers import AutoModelForSequenceClassification

    from tdkd_cli.io import data, models

    d, teacher = text
    task = sentiment_task(d / "multi", n_train=64, n_dev=8, seed=4)
    before = set(_cache_files())
    rc, _, err = _distill(task, teacher, d / "multi-run", capsys, "--epochs", "2")
    assert rc == 0, err
    assert teacher_forwards["teacher"] == 4  # 4 batches in epoch 1, none in epoch 2
    (path,) = set(_cache_files()) - before
    stored = load_file(str(path))
    assert stored["filled"].all() and stored["logits"].shape == (64, 2)
    # each example's cached logits are the teacher's logits for it (computed alone, no padding)
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    enc = data.encode(data.load_text(task, data.get_task("sst2"), "train"), models.load_tokenizer(teacher), 16, teacher)
    with torch.no_grad():
        for i in (0, 17, 63):
            alone = model(input_ids=torch.tensor([enc.input_ids[i]])).logits[0]
            assert torch.allclose(stored["logits"][i], alone, atol=1e-5), i
    # a max length that truncates (different inputs to the teacher) never reads that file
    rc, _, err = _distill(task, teacher, d / "multi-run-12", capsys, "--epochs", "1", "--max-length", "4")
    assert rc == 0 and "teacher cache: on, 0 of 64 examples cached" in err
    assert len(set(_cache_files()) - before) == 2
    # hidden-state KD reads more than the logits: the cache stays off and says why
    rc, _, err = _distill(task, teacher, d / "hidden", capsys, "--max-steps", "1", "--hidden-weight", "1")
    assert rc == 0 and "teacher cache: off (the run reads the teacher's hidden states or attention maps)" in err


def test_cache_unit_first_sight_values_and_unreadable_file(tmp_path):
    cache = TeacherCache(6, tmp_path / "c.safetensors", text=True, budget_bytes=2**20)
    first = Outputs(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert cache.lookup([0, 1], "cpu") is None
    assert cache.merge([0, 1], first) is first
    # a batch with one known and one new example: the known row keeps its first-sight value
    mixed = cache.merge([1, 2], Outputs(torch.tensor([[30.0, 40.0], [5.0, 6.0]])))
    assert mixed.logits.tolist() == [[3.0, 4.0], [5.0, 6.0]]
    assert cache.lookup([2, 0], "cpu").logits.tolist() == [[5.0, 6.0], [1.0, 2.0]]
    assert cache.lookup([2, 3], "cpu") is None and not cache.complete
    cache.save()
    again = TeacherCache(6, tmp_path / "c.safetensors", text=True, budget_bytes=2**20)
    assert again.load() == 3 and again.lookup([0, 1, 2], "cpu").logits.tolist() == [[1, 2], [3, 4], [5, 6]]
    (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file")
    assert TeacherCache(6, tmp_path / "c.safetensors", text=True, budget_bytes=2**20).load() == 0
    # token-level text features and a budget too small turn the cache off, with the reason
    tok = TeacherCache(6, None, text=True, budget_bytes=2**20)
    tok.merge([0], Outputs(torch.zeros(1, 2), features={"enc.layer.0": torch.zeros(1, 5, 8)}))
    assert not tok.on and "token axis" in tok.off_reason
    small = TeacherCache(6, None, text=False, budget_bytes=10)
    small.merge([0], Outputs(torch.zeros(1, 2)))
    assert not small.on and "teacher_cache_mb" in small.off_reason


def test_image_features_are_cached_with_the_logits(tmp_path, capsys, teacher_forwards):
    """A CNN pair with FitNets on a stage's feature maps: maps and logits are cached per image."""
    folder = digits_folder(tmp_path / "digits", count=64, dev_from=32)
    rc, out, err = run_cli(["distill", "--teacher", "resnet-digits", "--student", "resnet-digits-small", "--init", "random",
                            "--data", str(folder), "--no-mpo", "--batch-size", "16", "--epochs", "2", "--device", "cpu",
                            "--method", "fitnet:student=layer2,teacher=layer2", "--json", "-o", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    # binding.bind's shape probe (both models, eval mode) + 2 batches in epoch 1 (32 images), none in epoch 2
    assert teacher_forwards["teacher"] == 2 + 2
    (path,) = [p for p in _cache_files() if load_file(str(p))["logits"].shape == (32, 10)]
    stored = load_file(str(path))
    assert stored["feature.layer2"].shape == (32, 64, 4, 4) and stored["filled"].all()


def test_bf16_and_fp16_runs_store_precision_resume_and_merge(text, capsys):
    d, teacher = text
    task = sentiment_task(d / "prec", n_train=64, n_dev=16, seed=5)
    losses = {}
    for prec in ("fp32", "bf16", "fp16"):
        run = d / f"prec-{prec}"
        rc, out, err = _distill(task, teacher, run, capsys, "--max-steps", "6", "--save-every", "3", "--keep-last", "9",
                                "--precision", prec, "--lr", "1e-3", "--alpha", "0.5")
        assert rc == 0, err
        assert f"precision: {prec}" in (run / "recipe.yaml").read_text()
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        losses[prec] = [r["loss"] for r in recs]
        assert all(torch.isfinite(torch.tensor(losses[prec])))
    # low precision is not float32 to the bit, but follows it closely on this task
    assert losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"][0] - losses["fp32"][0]) < 0.05 * losses["fp32"][0]
    # fp16 keeps its loss scale in the run's state, and a resumed run ends bitwise where the straight one did
    state = json.loads((d / "prec-fp16" / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] > 0
    shutil.copytree(d / "prec-bf16", d / "prec-bf16-half")
    shutil.rmtree(d / "prec-bf16-half" / "checkpoints" / "step-0000006")
    rc, _, err = _distill(task, teacher, d / "prec-bf16-half", capsys, "--max-steps", "6", "--save-every", "3",
                          "--keep-last", "9", "--precision", "bf16", "--lr", "1e-3", "--alpha", "0.5", "--resume")
    assert rc == 0, err
    a, b = _tensors(d / "prec-bf16", 6), _tensors(d / "prec-bf16-half", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rc, _, err = _distill(task, teacher, d / "prec-bf16", capsys, "--max-steps", "6", "--precision", "fp32", "--resume")
    assert rc == 2 and "precision differs (stored 'bf16', given 'fp32')" in err
    # the bf16-trained student merges (verified against its MPO form in float32) and loads as plain transformers
    rc, out, err = run_cli(["merge", str(d / "prec-bf16" / "best"), "-o", str(d / "prec-merged"), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["max_rel_diff"] < 1e-4
    rc, _, err = _distill(task, teacher, d / "prec-bad", capsys, "--max-steps", "1", "--precision", "fp8")
    assert rc == 2 and "precision must be fp32, bf16 or fp16 (got 'fp8')" in err and not (d / "prec-bad").exists()


def test_tensorboard_events_read_back_as_metrics_jsonl(text, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, teacher = text
    task = sentiment_task(d / "tb", n_train=32, n_dev=8, seed=6)
    run = d / "tb-run"
    rc, _, err = _distill(task, teacher, run, capsys, "--max-steps", "4", "--eval-every", "2", "--tensorboard")
    assert rc == 0, err
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval" in r]
    assert len(train) == 4 and len(evals) == 2
    for key in ("loss", "kd", "lr", "grad_norm", "tensor"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in train]
        assert [e.value for e in events] == pytest.approx([r[key] for r in train], rel=1e-6, abs=1e-12)
    events = acc.Scalars("eval/accuracy")
    assert [(e.step, e.value) for e in events] == [(r["step"], pytest.approx(r["eval"]["accuracy"])) for r in evals]


def test_tensorboard_missing_is_one_line_and_nothing_written(text, capsys, monkeypatch):
    import sys

    d, teacher = text
    task = sentiment_task(d / "tb2", n_train=32, n_dev=8, seed=6)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    rc, _, err = _distill(task, teacher, d / "tb2-run", capsys, "--max-steps", "1", "--tensorboard")
    assert rc == 2 and "--tensorboard needs the tensorboard package" in err and not (d / "tb2-run").exists()

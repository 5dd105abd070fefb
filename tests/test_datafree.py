"""Data-free distillation: the inversion losses (against hand computations), `tdkd synthesize`
(loss goes down, a valid image folder that `tdkd distill --dev-data` trains on, resume bitwise,
bad input), on a tiny ResNet teacher whose BatchNorm statistics come from real digit images."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from tdkd_cli.io import data as data_mod
from tdkd_cli.methods import inversion
from tdkd_cli.tools import synthesize as synth

from .helpers import digits_folder, run_cli, tiny_vit_dir

TINY_ARGS = {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "stem_width": 8,
             "pretrained_cfg_overlay": {"input_size": [3, 16, 16]}}


def tiny_cnn_dir(path, real_root):
    """A tiny timm ResNet (10 classes, 16x16 inputs) saved as a timm directory; its BatchNorm running
    statistics are those of real digit images (a few forward passes in train mode)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, **TINY_ARGS)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    images = data_mod.load_images(real_root, "train")
    x = data_mod.image_tensor(images.files, (16, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model.train()
    with torch.no_grad():
        for chunk in x.split(16):
            model(chunk)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10, "model_args": TINY_ARGS}))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("datafree")
    real = digits_folder(d / "real", count=80, dev_from=50)
    return d, real, tiny_cnn_dir(d / "teacher", real)


def _synth(teacher, out, capsys, *extra):
    return run_cli(["synthesize", str(teacher), "-o", str(out), "--count", "12", "--batch-size", "4",
                    "--steps", "4", "--save-every", "2", *extra], capsys)


# ----------------------------------------------------------------------------------------------
# the losses
# ----------------------------------------------------------------------------------------------
def test_bn_statistics_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()
    bns = [model[1], model[4]]
    for bn in bns:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 3, 6, 6)
    with inversion.BNStatsTap(model) as tap:
        model(x)
        got = float(tap.loss().detach())
    # by hand, in float64 numpy: the inputs of each BatchNorm layer
    a1 = model[0](x).detach().double().numpy()
    a2 = model[3](model[2](model[1](model[0](x)))).detach().double().numpy()
    want = 0.0
    for a, bn in zip((a1, a2), bns):
        mu = a.mean(axis=(0, 2, 3))
        var = ((a - mu[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
        want += np.linalg.norm(mu - bn.running_mean.double().numpy()) + np.linalg.norm(var - bn.running_var.double().numpy())
    assert got == pytest.approx(want, rel=1e-5)
    assert [n for n, _ in inversion.bn_layers(model)] == ["1", "4"]


def test_priors_and_js_divergence_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 1.0]]]])  # (1, 1, 2, 2)
    # vertical diffs 3, 0 -> mean 4.5; horizontal 1, -2 -> mean 2.5
    assert float(inversion.total_variation(x)) == pytest.approx(4.5 + 2.5)
    assert float(inversion.l2_prior(x)) == pytest.approx(11.0)
    # diversity: pairs of the same class only; mean |difference| per element
    imgs = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2), 3 * torch.ones(1, 2, 2), torch.full((1, 2, 2), 7.0)])
    assert float(inversion.diversity(imgs, torch.tensor([0, 0, 0, 1]))) == pytest.approx((1 + 3 + 2) / 3)
    assert float(inversion.diversity(imgs, torch.tensor([0, 1, 2, 3]))) == 0.0
    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    p, q = torch.softmax(a, -1).double().numpy()[0], torch.softmax(b, -1).double().numpy()[0]
    m = (p + q) / 2
    want = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert float(inversion.js_divergence(a, b)) == pytest.approx(want, rel=1e-5)
    assert float(inversion.js_divergence(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(inversion.js_divergence(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))) == pytest.approx(math.log(2), rel=1e-4)


def test_synthesized_images_decrease_the_inversion_loss(setup, tmp_path):
    _, _, teacher = setup
    inv = synth.load_inverter(str(teacher))
    assert inv.size == (16, 16) and inv.num_classes == 10
    cfg = synth.SynthesisConfig(count=20, batch_size=20, steps=10, save_every=100)

    def score(gen):  # the saved (8-bit) images of one sampled batch, scored from outside the loop
        px, y = synth.sample_batch(inv, gen, cfg, 0, 0, 20)
        with inversion.BNStatsTap(inv.teacher) as tap, torch.no_grad():
            return inversion.inversion_loss(inv.teacher, tap, synth.from_pixels(px, inv), y, cfg.weights)

    before, t0 = score(synth.new_generator(inv, cfg))
    gen, log = synth.train_generator(inv, cfg, tmp_path)
    after, t1 = score(gen)
    assert float(after) < 0.7 * float(before) and log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert t1["bn"] < t0["bn"] and t1["ce"] < t0["ce"]
    assert [e["step"] for e in log] == [1, 10] and (tmp_path / "generator-000010" / "state.safetensors").is_file()


def test_adaptive_term_seeks_disagreement(setup):
    d, _, teacher = setup
    inv = synth.load_inverter(str(teacher))
    student = synth.load_inverter(str(teacher)).teacher  # a copy: it agrees everywhere, JS = 0
    inv.student = student
    x = torch.randn(4, 3, 16, 16)
    w = inversion.InversionWeights(ce=1.0, bn=0.5, tv=2.0, l2=1e-3, div=0.25, adaptive=2.0)
    with inversion.BNStatsTap(inv.teacher) as tap, torch.no_grad():
        total, terms = inversion.inversion_loss(inv.teacher, tap, x, torch.arange(4), w, student)
    assert terms["adaptive"] == pytest.approx(1.0, abs=1e-6)
    expect = (terms["ce"] + 0.5 * terms["bn"] + 2.0 * terms["tv"] + 1e-3 * terms["l2"] - 0.25 * terms["div"]
              + 2.0 * terms["adaptive"])
    assert float(total) == pytest.approx(expect, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# the command: output, distill on it, resume
# ----------------------------------------------------------------------------------------------
def test_synthesize_writes_an_image_folder_that_distill_trains_on(setup, capsys):
    d, real, teacher = setup
    out = d / "synth"
    rc, stdout, err = _synth(teacher, out, capsys, "--classes", str(real))
    assert rc == 0, err
    assert "synthesized 12 images of 10 classes at 16x16" in stdout
    assert not (d / "synth.partial").exists()
    images = data_mod.load_images(out, "train")
    assert len(images) == 12 and images.classes == [str(i) for i in range(10)]
    assert sorted(images.labels) == sorted(i % 10 for i in range(12))
    data_mod.check_images(images.files)
    info = json.loads((out / "synthesis.json").read_text())
    assert info["count"] == 12 and len(info["batches"]) == 3
    assert info["generator_log"][-1]["loss"] < info["generator_log"][0]["loss"] and info["steps"] == 4
    # the student never sees a real training image; its dev split is the real one
    run = d / "run"
    rc, stdout, err = run_cli(["distill", "--teacher", str(teacher), "--student", "resnet-digits-small", "--init", "random",
                               "--data", str(out), "--dev-data", str(real), "--max-steps", "2", "--batch-size", "6",
                               "--no-mpo", "--json", "-o", str(run)], capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["dev_examples"] == 30 and summary["train_examples"] == 12 and "top1" in summary["final_metrics"]
    assert f"dev_data: {real}" in (run / "recipe.yaml").read_text()
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and "top1" in evals[-1]["eval"]


class Killed(BaseException):
    pass


def _kill_at(step=None, batch=None):
    def on_step(i, terms):
        if i == step:
            raise Killed
    def on_batch(i, info):
        if i == batch:
            raise Killed
    return {"on_step": on_step, "on_batch": on_batch}


def test_interrupted_synthesis_resumes_without_redoing_work_bitwise(setup, capsys, monkeypatch):
    d, _, teacher = setup
    rc, _, err = _synth(teacher, d / "whole", capsys)  # 4 steps, saved at 2 and 4; 3 batches of 4
    assert rc == 0, err
    cfg = synth.SynthesisConfig(count=12, batch_size=4, steps=4, save_every=2)
    out, work = d / "resumed", d / "resumed.partial"
    with pytest.raises(Killed):  # killed during step 3: the state of step 2 is on disk
        synth.synthesize(str(teacher), out, cfg, **_kill_at(step=3))
    assert [p.name for p in work.glob("generator-*")] == ["generator-000002"] and not out.exists()
    steps, batches, real_step, real_sample = [], [], synth.train_step, synth.sample_batch
    monkeypatch.setattr(synth, "train_step", lambda *a: steps.append(a[-1]) or real_step(*a))
    monkeypatch.setattr(synth, "sample_batch", lambda *a: batches.append(a[3]) or real_sample(*a))
    with pytest.raises(Killed):  # killed once batch 0 is on disk
        synth.synthesize(str(teacher), out, cfg, **_kill_at(batch=0))
    assert steps == [2, 3] and batches == [0] and (work / "batches" / "00000").is_dir()
    (work / "batches" / ".00001.tmp").mkdir()  # a batch being written when the process died
    starts = []
    report = synth.synthesize(str(teacher), out, cfg, on_start=lambda total, done: starts.append((total, done)))
    assert starts == [(7, 5)] and steps == [2, 3] and batches == [0, 1, 2]  # nothing redone
    assert report["batches_resumed"] == 1 and report["images_made"] == 8 and not work.exists()
    a, b = _pngs(d / "whole"), _pngs(out)
    assert len(a) == 12 and a == b  # bitwise the images of the uninterrupted run


def _pngs(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_resume_with_other_settings_is_refused(setup, capsys):
    d, _, teacher = setup
    cfg = synth.SynthesisConfig(count=8, batch_size=4, steps=2)
    with pytest.raises(Killed):
        synth.synthesize(str(teacher), d / "other", cfg, **_kill_at(batch=0))
    rc, _, err = run_cli(["synthesize", str(teacher), "-o", str(d / "other"), "--count", "8", "--batch-size", "4",
                          "--steps", "5"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "unfinished synthesis with another steps (2, now 5)" in err
    rc, _, err = run_cli(["synthesize", str(teacher), "-o", str(d / "other"), "--count", "8", "--batch-size", "4",
                          "--steps", "2", "--force"], capsys)
    assert rc == 0, err


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------
def test_teacher_without_batchnorm_is_one_line_and_writes_nothing(tmp_path, capsys):
    _, vit = tiny_vit_dir(tmp_path / "vit")
    out = tmp_path / "synth"
    rc, stdout, err = run_cli(["synthesize", str(vit), "-o", str(out), "--count", "4"], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "has no BatchNorm layers" in err and "cannot be inverted" in err
    assert not out.exists() and not (tmp_path / "synth.partial").exists()


@pytest.mark.parametrize("args,message", [
    (["--count", "0"], "--count must be at least 1"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--save-every", "0"], "--save-every must be at least 1"),
    (["--tv-weight", "-1"], "--tv-weight must be a number >= 0"),
    (["--adaptive-weight", "1"], "--adaptive-weight needs --student"),
    (["--classes", "a,b"], "--classes names 2 classes, the teacher has 10 outputs"),
    (["--classes", "9,8,7,6,5,4,3,2,1,0"], "--classes must be distinct names in sorted order"),
    (["--count", "ten"], "Invalid value for '--count'"),
])
def test_bad_options_are_one_line(setup, capsys, args, message):
    d, _, teacher = setup
    out = d / "bad"
    rc, _, err = run_cli(["synthesize", str(teacher), "-o", str(out), *args], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not (d / "bad.partial").exists()


def test_dev_data_with_other_classes_is_refused(setup, capsys, tmp_path):
    d, real, teacher = setup
    other = tmp_path / "other"
    (other / "dev" / "cat").mkdir(parents=True)
    src = next((real / "dev").rglob("*.png"))
    (other / "dev" / "cat" / "x.png").write_bytes(src.read_bytes())
    rc, _, err = run_cli(["distill", "--teacher", str(teacher), "--student", "resnet-digits-small", "--init", "random",
                          "--data", str(real), "--dev-data", str(other), "--max-steps", "1", "-o", str(tmp_path / "run")], capsys)
    assert rc == 2 and "has other classes than the training data" in err and err.count("\n") == 1
    rc, _, err = run_cli(["distill", "--teacher", str(teacher), "--student", "resnet-digits-small", "--init", "random",
                          "--data", str(real), "--dev-data", str(tmp_path / "nowhere"), "--max-steps", "1", "-o", str(tmp_path / "run")], capsys)
    assert rc == 2 and "dev data" in err and "not found" in err


def test_synthesize_help_is_lazy_and_whole(capsys, monkeypatch):
    import re
    import subprocess
    import sys

    import typer.main

    from tdkd_cli.cli.app import app

    code = ("import sys\nfrom tdkd_cli.cli.app import main\n"
            "try:\n    main(['synthesize', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]\nassert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("COLUMNS", "100")
    rc, out, _ = run_cli(["synthesize", "--help"], capsys)
    flat = lambda text: re.sub(r"\s+", "", text.replace("│", ""))  # noqa: E731
    texts = [p.help for p in typer.main.get_command(app).commands["synthesize"].params if getattr(p, "help", None)]
    assert rc == 0 and len(texts) > 15 and all(flat(t) in flat(out) for t in texts)

"""Over-parameterized convolutions: Conv2d weights as MPOs (round trips, whole timm CNNs, merge to
plain timm, the stage-wise tensor constraint, distill/resume on the digits folder, bad input)."""

import json
import shutil

import pytest
import torch
from torch import nn

from tdkd_cli.io import layers, models, pair
from tdkd_cli.tensor import constraint, mpo, tensorize
from tdkd_cli.core.errors import UsageError
from tdkd_cli.core.reporting import Reporter

from .helpers import digits_folder, run_cli


def _decompose_and_merge(model, names, n=5):
    plans = tensorize.plan_layers(model, names, n)
    tensorize.tensorize(model, plans)
    return plans


@pytest.mark.parametrize("conv", [
    dict(in_channels=8, out_channels=12, kernel_size=1),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=16, kernel_size=7, stride=2, padding=3),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=8, out_channels=12, kernel_size=3, groups=4, padding=1),
    dict(in_channels=12, out_channels=12, kernel_size=(3, 5), groups=12, stride=(2, 1)),  # depthwise
])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_conv2d_round_trip_is_exact(conv, n):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(**conv, bias=True)).double()
    original = net[0].weight.detach().clone()
    x = torch.randn(2, conv["in_channels"], 17, 15, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
    (plan,) = _decompose_and_merge(net, ["0"], n)
    out_c, per_group, kh, kw = original.shape
    assert plan.weight_shape == (out_c, per_group, kh, kw) and plan.in_features == per_group * kh * kw
    # the kernel window lies in the last input factor, the channels in the others
    assert plan.in_shape[-1] % (kh * kw) == 0 and mpo.math.prod(plan.in_shape[:-1]) * plan.in_shape[-1] // (kh * kw) == per_group
    assert isinstance(net[0], nn.Conv2d) and tensorize.mpo_modules(net)
    assert (net[0].stride, net[0].padding, net[0].dilation, net[0].groups) == (
        nn.Conv2d(**conv).stride, nn.Conv2d(**conv).padding, nn.Conv2d(**conv).dilation, nn.Conv2d(**conv).groups)
    assert mpo.relative_error(net[0].weight, original) <= 1e-12
    with torch.no_grad():
        assert float((net(x) - ref).abs().max()) <= 1e-10
    tensorize.merge(net)
    assert not tensorize.mpo_modules(net) and type(net[0].weight) is nn.Parameter
    assert net[0].weight.shape == original.shape
    assert mpo.relative_error(net[0].weight, original) <= 1e-12
    with torch.no_grad():
        assert float((net(x) - ref).abs().max()) <= 1e-10


def test_conv2d_round_trip_in_float32_per_weight_and_output():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, groups=2, dilation=2))
    originals = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    x = torch.randn(4, 16, 24, 24)
    with torch.no_grad():
        ref = net(x)
    _decompose_and_merge(net, ["0", "2"])
    tensorize.merge(net)
    for w, orig in zip((net[0].weight, net[2].weight), originals):
        assert mpo.relative_error(w, orig) <= 1e-6
    with torch.no_grad():
        assert float((net(x) - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "convnext_atto"])
def test_whole_timm_cnn_decomposes_merges_and_reloads_in_plain_timm(tmp_path, capsys, name):
    """tdkd decompose (default targets) -> tdkd merge -> timm.create_model(...).load_state_dict alone,
    outputs equal to the original model's."""
    import timm
    from safetensors.torch import load_file

    rc, out, err = run_cli(["decompose", name, "--init", "random", "--num-labels", "10", "--json", "-o", str(tmp_path / "mpo")], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["totals"]["max_rel_error"] <= 1e-6
    assert report["totals"]["overparam_ratio"] > 1.5
    convs = [L for L in report["layers"] if len(L["weight_shape"]) == 4]
    assert convs and all(L["rel_error"] <= 1e-6 for L in report["layers"])
    manifest = json.loads((tmp_path / "mpo" / "tdkd.json").read_text())
    assert manifest["layers"][convs[0]["name"]]["weight_shape"] == convs[0]["weight_shape"]
    rc, _, err = run_cli(["merge", str(tmp_path / "mpo"), "-o", str(tmp_path / "merged")], capsys)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    plain = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg.get("model_args", {})).eval()
    plain.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")))
    original = models.load_model(name, init="random", num_labels=10, seed=0).model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((plain(x) - original(x)).abs().max()) <= 1e-5


def test_default_cnn_targets_skip_only_the_classifier():
    import timm

    resnet = timm.create_model("resnet18", num_classes=10)
    names = tensorize.default_targets(resnet, "timm")
    convs = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(names) == convs and "fc" not in names and "layer2.0.downsample.0" in names
    convnext = timm.create_model("convnext_atto", num_classes=10)
    names = tensorize.default_targets(convnext, "timm")
    assert "stages.1.blocks.0.mlp.fc1" in names and "stages.1.blocks.0.conv_dw" in names and "head.fc" not in names
    mobile = timm.create_model("mobilenetv3_small_050", num_classes=10)
    assert "blocks.1.0.conv_dw" in tensorize.default_targets(mobile, "timm")  # depthwise: one MPO of (C, 1*kh*kw)


def test_cnn_blocks_pair_by_stage_and_cores_align():
    import timm

    s, t = timm.create_model("resnet18", num_classes=10), timm.create_model("resnet34", num_classes=10)
    partner = layers.block_partner(s, t)
    # ResNet-34 stages hold 3,4,6,3 blocks; ResNet-18's 2 per stage pair with ceil((i+1) L_T/2) - 1
    assert [partner(f"layer{k}.{i}.conv2") for k, i in ((1, 0), (1, 1), (2, 0), (3, 0), (3, 1), (4, 1))] == [
        "layer1.1.conv2", "layer1.2.conv2", "layer2.1.conv2", "layer3.2.conv2", "layer3.5.conv2", "layer4.2.conv2"]
    assert partner("conv1") == "conv1" and partner("layer2.0.downsample.0") is None  # teacher block 1 has none
    # narrower student: channel factors planned against the teacher's, kernel window in the last factor
    narrow = models.Loaded(timm.create_model("resnet18", num_classes=10, layers=[1, 1, 1, 1], channels=[16, 32, 64, 128],
                                             stem_width=16), "timm", {})
    wide = models.Loaded(timm.create_model("resnet18", num_classes=10, channels=[32, 64, 128, 256], stem_width=32), "timm", {})
    recipe = type("R", (), dict(targets=None, shapes=None, n=5))()
    pair.decompose_student(narrow, wide, recipe, Reporter())
    t_cores, pairs = constraint.teacher_cores(narrow.model, wide.model, layers.partner_fn(narrow.model, wide.model))
    by_name = {p.student: p for p in pairs}
    assert by_name["layer3.0.conv2"].teacher == "layer3.1.conv2" and len(by_name["layer3.0.conv2"].cores) >= 3
    student_cores = {n: tensorize.layer_cores(m) for n, m in tensorize.mpo_modules(narrow.model).items()}
    for p in pairs:
        for k in p.cores:
            assert student_cores[p.student][k].shape == t_cores[p.teacher][k].shape
    # the teacher's cores are its exact weight
    w = dict(wide.model.named_modules())["layer3.1.conv2"].weight
    assert mpo.relative_error(mpo.contract(t_cores["layer3.1.conv2"]), w.reshape(w.shape[0], -1)) <= 1e-6


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnn")
    return d, digits_folder(d / "digits", count=160, dev_from=128)


def _distill(d, folder, run, capsys, *extra):
    return run_cli(["distill", "--teacher", "resnet-digits", "--student", "resnet-digits-small", "--init", "random",
                    "--data", str(folder), "--mpo", "--tensor-lambda", "1e-2", "--lr", "3e-3", "--batch-size", "16",
                    "--log-every", "1", "--save-every", "1", "--keep-last", "99", "--device", "cpu", "--json",
                    "-o", str(run), *extra], capsys)


def test_cnn_pair_distills_resumes_bitwise_and_merges(digits, capsys):
    from safetensors.torch import load_file

    d, folder = digits
    rc, out, err = _distill(d, folder, d / "full", capsys, "--max-steps", "16")
    assert rc == 0, err
    report = json.loads(out)
    assert report["aligned_cores"] > 0
    recs = [json.loads(x) for x in (d / "full" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 16 and all(r["tensor"] > 0 for r in recs)
    first, last = sum(r["loss"] for r in recs[:4]) / 4, sum(r["loss"] for r in recs[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    # resumed from step 8 it ends bitwise where the straight run did
    shutil.copytree(d / "full", d / "half")
    for step in range(9, 17):
        shutil.rmtree(d / "half" / "checkpoints" / f"step-{step:07d}")
    rc, _, err = _distill(d, folder, d / "half", capsys, "--max-steps", "16", "--resume")
    assert rc == 0, err
    for name in ("model.safetensors", "trainer_state.safetensors"):
        a = load_file(str(d / "full" / "checkpoints" / "step-0000016" / name))
        b = load_file(str(d / "half" / "checkpoints" / "step-0000016" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # merged: the plain 4-block timm ResNet, evaluated like the MPO form
    rc, _, err = run_cli(["merge", str(d / "full" / "best"), "-o", str(d / "merged")], capsys)
    assert rc == 0, err
    scores = []
    for model in (d / "full" / "best", d / "merged"):
        rc, out, err = run_cli(["eval", str(model), "--data", str(folder), "--json"], capsys)
        assert rc == 0, err
        scores.append(json.loads(out)["metrics"]["top1"])
    assert scores[0] == scores[1]


def test_conv_bad_input(tmp_path, capsys):
    for args, says in [
        (["--targets", "layer9*"], "matches no Linear or Conv2d layer"),
        (["--shapes", "64=4,4,4,1,2"], "multiplies to 128, not the dimension 64"),
        (["--shapes", "100=10,1,1,1,10"], "no target layer has a dimension of 100"),
    ]:
        out = tmp_path / "out"
        rc, _, err = run_cli(["decompose", "resnet18", "--init", "random", "-o", str(out), *args], capsys)
        assert rc == 2 and says in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 2)
            self.vol = nn.Conv3d(4, 4, 3)
            self.conv = nn.Conv2d(4, 4, 3)

    for pat, kind in (("up", "ConvTranspose2d"), ("vol", "Conv3d"), ("*", "ConvTranspose2d")):
        with pytest.raises(UsageError, match=f"a {kind}: tdkd decomposes Linear and Conv2d layers only"):
            tensorize.select_targets(Odd(), [pat])
    assert tensorize.select_targets(Odd(), ["conv"]) == ["conv"]


def test_conv_manifest_damage_is_one_line(tmp_path, capsys):
    rc, _, err = run_cli(["decompose", "resnet-digits-small", "--init", "random", "--num-labels", "10", "-o", str(tmp_path / "m")], capsys)
    assert rc == 0, err
    path = tmp_path / "m" / "tdkd.json"
    good = json.loads(path.read_text())
    for damage, says in [
        ({"weight_shape": [16, 16, 3, 4]}, "weight_shape must be [out, in/groups, kh, kw]"),
        ({"weight_shape": None}, "source describes layer1.0.conv2.weight as [16, 16, 3, 3], its layer entry as [16, 144]"),
    ]:
        m = json.loads(json.dumps(good))
        m["layers"]["layer1.0.conv2"].update(damage)
        if damage.get("weight_shape", 0) is None:
            del m["layers"]["layer1.0.conv2"]["weight_shape"]
        path.write_text(json.dumps(m))
        rc, _, err = run_cli(["merge", str(tmp_path / "m"), "-o", str(tmp_path / "out")], capsys)
        assert rc == 1 and says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()

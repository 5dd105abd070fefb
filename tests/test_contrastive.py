"""CRD (contrastive representation distillation) and feature methods across architectures
(a ViT teacher and a CNN student)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tdkd_cli.methods.contrastive import CRD, nce_loss, pooled
from tdkd_cli.methods.connectors import LayoutConnector, token_grid

from .helpers import digits_folder, run_cli, sentiment_task, tiny_pair, tiny_vit_dir


def test_nce_loss_equals_a_hand_computation_on_a_tiny_bank():
    torch.manual_seed(0)
    n, k, dim, t, m = 6, 3, 4, 0.5, 0.5
    crd = CRD(5, 7, n, feat_dim=dim, nce_k=k, temperature=t, momentum=m, seed=3)
    s_feat, t_feat = torch.randn(2, 5), torch.randn(2, 7)
    index = torch.tensor([1, 4])
    bank_s, bank_t = crd.bank_s.clone(), crd.bank_t.clone()
    rng = crd.rng.clone()
    loss = crd(s_feat, t_feat, index)
    # the same draw of negatives, then every number by hand
    g = torch.Generator()
    g.set_state(rng)
    idx = torch.randint(0, n, (2, k + 1), generator=g).tolist()
    for i, row in enumerate(idx):
        row[0] = int(index[i])

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    def head(lin, f):
        return unit([sum(w * x for w, x in zip(lin.weight[j].tolist(), f.tolist())) + lin.bias.tolist()[j] for j in range(dim)])

    v_s = [head(crd.head_s, s_feat[i]) for i in range(2)]
    v_t = [head(crd.head_t, t_feat[i]) for i in range(2)]

    def side(v, bank):
        scores = [[math.exp(sum(a * b for a, b in zip(bank[j].tolist(), v[i])) / t) for j in idx[i]] for i in range(2)]
        z = sum(map(sum, scores)) / (2 * (k + 1)) * n
        noise = k / n
        total = 0.0
        for row in scores:
            p = [x / z for x in row]
            total += math.log(p[0] / (p[0] + noise + 1e-7)) + sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
        return -total / 2

    expected = side(v_s, bank_t) + side(v_t, bank_s)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    # the banks' rows of the batch moved towards the new embeddings (momentum, then normalised)
    for i, j in enumerate(index.tolist()):
        row = unit([m * a + (1 - m) * b for a, b in zip(bank_s[j].tolist(), v_s[i])])
        assert crd.bank_s[j].tolist() == pytest.approx(row, abs=1e-6)
    untouched = [j for j in range(n) if j not in index.tolist()]
    assert torch.equal(crd.bank_t[untouched], bank_t[untouched])
    assert nce_loss(torch.tensor([[1.0, 0.5]]), 4).item() == pytest.approx(
        -(math.log(1 / (1 + 0.25 + 1e-7)) + math.log(0.25 / (0.5 + 0.25 + 1e-7))), rel=1e-6)


def test_crd_gradients_reach_the_student_and_the_heads_not_the_teacher():
    crd = CRD(8, 6, 20, feat_dim=4, nce_k=5)
    s = torch.randn(3, 8, 2, 2, requires_grad=True)  # a CNN map: pooled over positions
    t = torch.randn(3, 5, 6, requires_grad=True)  # tokens: the first one
    crd(s, t, torch.tensor([0, 7, 19])).backward()
    assert float(s.grad.abs().sum()) > 0 and t.grad is None
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in crd.parameters())
    assert pooled(torch.ones(2, 3, 4, 4)).shape == (2, 3) and pooled(torch.ones(2, 5, 7)).shape == (2, 7)


def test_layout_connectors_between_maps_and_tokens():
    assert token_grid(17) == (4, 1) and token_grid(16) == (4, 0) and token_grid(50) == (7, 1) and token_grid(35) is None
    to_tokens = LayoutConnector((2, 8, 5, 5), (2, 17, 12))
    assert to_tokens(torch.randn(2, 8, 5, 5)).shape == (2, 16, 12)
    assert to_tokens.teacher_view(torch.randn(2, 17, 12)).shape == (2, 16, 12)
    to_map = LayoutConnector((2, 17, 12), (2, 8, 5, 5))
    assert to_map(torch.randn(2, 17, 12)).shape == (2, 8, 5, 5)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("crd")
    return d, digits_folder(d / "digits", count=120, dev_from=80), tiny_vit_dir(d / "vit")[1]


def _distill(folder, teacher, run, capsys, *extra):
    return run_cli(["distill", "--data", str(folder), "--teacher", str(teacher), "--student", "resnet-digits-small",
                    "--init", "random", "--mpo", "--n", "3", "--tensor-lambda", "0", "--batch-size", "16",
                    "--log-every", "1", "--save-every", "1", "--keep-last", "9", "-o", str(run), *extra], capsys)


def _state(run, step):
    d = run / "checkpoints" / f"step-{step:07d}"
    return load_file(str(d / "model.safetensors")), load_file(str(d / "trainer_state.safetensors"))


def test_vit_teacher_to_mpo_resnet_with_crd_resumes_bitwise_and_merges_to_plain_timm(digits, capsys):
    import timm

    d, folder, vit = digits
    spec = "crd:weight=1,student=layer4,teacher=blocks.1,nce_k=32,feat_dim=16"
    rc, out, err = _distill(folder, vit, d / "full", capsys, "--method", spec, "--max-steps", "4", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["connectors"][0].startswith("crd.0: CRD heads 128/48 -> 16, memory banks 2 x 80 x 16, 32 negatives")
    recs = [json.loads(x) for x in (d / "full" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 4 and all(math.isfinite(r["crd"]) and r["crd"] > 0 for r in recs)
    model, state = _state(d / "full", 4)
    assert state["crd.0.bank_s"].shape == (80, 16) and float(state["crd.0.z"].min()) > 0
    assert not [k for k in model if k.startswith("crd")]
    shutil.copytree(d / "full", d / "half")
    for step in (3, 4):
        shutil.rmtree(d / "half" / "checkpoints" / f"step-{step:07d}")
    rc, _, err = _distill(folder, vit, d / "half", capsys, "--method", spec, "--max-steps", "4", "--resume")
    assert rc == 0, err
    model2, state2 = _state(d / "half", 4)
    assert all(torch.equal(model[k], model2[k]) for k in model)
    assert all(torch.equal(state[k], state2[k]) for k in state if k.startswith("crd."))  # banks, Z, generator
    rc, _, err = run_cli(["merge", str(d / "full" / "best"), "-o", str(d / "merged")], capsys)
    assert rc == 0, err
    plain = timm.create_model("resnet18", num_classes=10, **json.loads((d / "merged" / "config.json").read_text())["model_args"])
    plain.load_state_dict(load_file(str(d / "merged" / "model.safetensors")))


def test_vit_teacher_to_mpo_resnet_with_fitnet_hints_across_layouts(digits, capsys):
    d, folder, vit = digits
    rc, out, err = _distill(folder, vit, d / "fit", capsys, "--method", "fitnet:weight=1,student=layer3,teacher=blocks.1",
                            "--max-steps", "3", "--json")
    assert rc == 0, err
    assert json.loads(out)["connectors"] == ["fitnet.0: feature map -> tokens (4x4 grid), Linear 64 -> 48 from layer3 to blocks.1"]
    recs = [json.loads(x) for x in (d / "fit" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(r["fitnet"] > 0 for r in recs)
    rc, _, err = run_cli(["merge", str(d / "fit" / "best"), "-o", str(d / "fit-merged")], capsys)
    assert rc == 0, err


def test_crd_and_cross_architecture_bad_input(digits, tmp_path, capsys):
    d, folder, vit = digits
    rc, _, err = _distill(folder, vit, tmp_path / "a", capsys, "--method", "crd:student=layer4,teacher=blocks.1,nce_k=500",
                          "--max-steps", "1")
    assert rc == 2 and "nce_k=500 negatives need more training examples than that (this run has 80)" in err
    assert not (tmp_path / "a").exists()
    text = sentiment_task(tmp_path)
    teacher = tiny_pair(tmp_path)
    rc, _, err = run_cli(["distill", "--data", str(text), "--teacher", str(teacher), "--student-layers", "0,1",
                          "--method", "crd:student=bert.embeddings.position_embeddings,teacher=bert.embeddings.position_embeddings",
                          "--max-steps", "1", "-o", str(tmp_path / "b")], capsys)
    assert rc == 2 and "it has no batch dimension" in err and not (tmp_path / "b").exists()
    rc, _, err = _distill(folder, teacher, tmp_path / "c", capsys, "--max-steps", "1")  # a text teacher, an image student
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()

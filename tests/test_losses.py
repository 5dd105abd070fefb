"""Each loss term against a hand computation on fixed tensors; the tensor constraint's gradients."""

import math
import re

import pytest
import torch

from tdkd_cli.io import layers
from tdkd_cli.methods import losses
from tdkd_cli.tensor import constraint
from tdkd_cli.tensor import mpo
from tdkd_cli.core.errors import UsageError


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, -1.0]])
    for temp in (1.0, 2.0):
        ps = [[math.exp(v / temp) for v in row] for row in s.tolist()]
        pt = [[math.exp(v / temp) for v in row] for row in t.tolist()]
        ps = [[v / sum(r) for v in r] for r in ps]
        pt = [[v / sum(r) for v in r] for r in pt]
        kl = sum(sum(b * math.log(b / a) for a, b in zip(rs, rt)) for rs, rt in zip(ps, pt)) / 2
        assert float(losses.kd_loss(s, t, temp)) == pytest.approx(temp * temp * kl, rel=1e-5)
    assert float(losses.kd_loss(t, t, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_ce_loss_by_hand():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    expect = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    assert float(losses.ce_loss(z, y)) == pytest.approx(expect, rel=1e-6)
    assert float(losses.ce_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0]))) == pytest.approx(1.0)


def test_teacher_layer_map():
    assert [layers.teacher_layer(i, 6, 12) for i in range(6)] == [1, 3, 5, 7, 9, 11]
    assert [layers.teacher_layer(i, 3, 6) for i in range(3)] == [1, 3, 5]
    assert [layers.teacher_layer(i, 4, 12) for i in range(4)] == [2, 5, 8, 11]
    assert layers.layer_map(None, 4, 12) == layers.layer_map("uniform", 4, 12) == [2, 5, 8, 11]
    assert layers.layer_map(" 0, 1,2 ", 3, 6) == [0, 1, 2]
    assert layers.layer_map("5,5,5", 3, 6) == [5, 5, 5]  # several student layers may share a partner
    for bad, msg in (("0,1", "names 2 teacher layers but the student has 3"), ("0,1,6", "layers 0..5 (got 6)"),
                     ("0,-1,2", "expected 'uniform'"), ("a,b,c", "expected 'uniform'")):
        with pytest.raises(UsageError, match=re.escape(msg)):
            layers.layer_map(bad, 3, 6)


def test_explicit_layer_map_pairs_those_layers():
    shapes = [(1, 2, 2, 4), (4, 2, 2, 1)]
    pairs = constraint.pair_layers({f"enc.layer.{i}.q": shapes for i in range(3)},
                               {f"enc.layer.{i}.q": shapes for i in range(6)},
                                   lambda n: layers.partner_name(n, [0, 1, 2]))
    assert [(p.student, p.teacher) for p in pairs] == [(f"enc.layer.{i}.q", f"enc.layer.{i}.q") for i in range(3)]
    assert layers.partner_name("enc.layer.1.q", [4, 2, 0]) == "enc.layer.2.q"
    assert layers.partner_name("enc.embeddings.word", [4, 2, 0]) is None


def test_hidden_and_attention_mse_by_hand():
    s = [torch.ones(1, 2, 2), torch.zeros(1, 2, 2)]
    t = [torch.zeros(1, 2, 2), torch.full((1, 2, 2), 3.0)]
    assert float(losses.hidden_mse(s, t, [(0, 0), (1, 1)])) == pytest.approx((1.0 + 9.0) / 2)
    mask = torch.tensor([[1, 0]])
    s2 = [torch.tensor([[[1.0, 1.0], [5.0, 5.0]]])]
    t2 = [torch.zeros(1, 2, 2)]
    assert float(losses.hidden_mse(s2, t2, [(0, 0)], mask=mask)) == pytest.approx(1.0)
    proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    t3 = [torch.zeros(1, 1, 3)]
    with torch.no_grad():
        got = float(losses.hidden_mse([torch.tensor([[[1.0, 2.0]]])], t3, [(0, 0)], projection=proj))
    assert got == pytest.approx((1 + 4 + 9) / 3)
    a = [torch.full((1, 1, 2, 2), 0.5)]
    b = [torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])]
    assert float(losses.attention_mse(a, b, [(0, 0)])) == pytest.approx(0.25)


def _cores(out_s, in_s, seed, requires_grad):
    w = torch.randn(math.prod(out_s), math.prod(in_s), generator=torch.Generator().manual_seed(seed))
    return [c.requires_grad_(requires_grad) for c in mpo.decompose(w, out_s, in_s)]


def test_paper_shapes_start_with_equal_identity_middle_cores():
    """With singleton shapes the middle cores of student and teacher both start as the identity, so
    the constraint on them is exactly zero at initialisation (it acts once training moves them)."""
    s = _cores((4, 1, 1, 1, 3), (4, 1, 1, 1, 3), 0, False)
    t = _cores((4, 1, 1, 1, 3), (4, 1, 1, 1, 3), 1, False)
    for k in (1, 3):
        assert torch.equal(s[k], t[k])


def test_tensor_constraint_by_hand_and_gradients():
    shapes = ((2, 2, 1, 2, 3), (3, 1, 2, 2, 2))
    student = {"enc.layer.0.q": _cores(*shapes, 0, True), "enc.layer.1.q": _cores(*shapes, 1, True)}
    teacher = {f"enc.layer.{i}.q": [torch.nn.Parameter(c) for c in _cores(*shapes, 10 + i, False)] for i in range(4)}
    pairs = constraint.pair_layers({k: [c.shape for c in v] for k, v in student.items()},
                               {k: [c.shape for c in v] for k, v in teacher.items()},
                                   lambda n: layers.partner_name(n, layers.layer_map(None, 2, 4)))
    assert [(p.student, p.teacher, p.cores) for p in pairs] == [("enc.layer.0.q", "enc.layer.1.q", (0, 1, 3, 4)),
                                                              ("enc.layer.1.q", "enc.layer.3.q", (0, 1, 3, 4))]
    loss = constraint.tensor_constraint_loss(student, teacher, pairs)
    expect = 0.0
    for p in pairs:
        expect += sum(float(((student[p.student][k] - teacher[p.teacher][k]).detach() ** 2).mean()) for k in p.cores)
    assert float(loss.detach()) == pytest.approx(expect / 2, rel=1e-6)
    loss.backward()
    for name, cores in student.items():
        for k, c in enumerate(cores):
            if k == 2:  # central core: not constrained
                assert c.grad is None or float(c.grad.abs().sum()) == 0.0
            else:
                assert c.grad is not None and float(c.grad.abs().sum()) > 0.0, (name, k)
    assert all(c.grad is None for cores in teacher.values() for c in cores)


def test_different_widths_align_only_matching_cores():
    # student 312 wide, teacher 768 wide, trailing factors chosen equal: (.., 12) x (.., 12)
    s_shapes = [tuple(c.shape) for c in _cores((26, 1, 12), (26, 1, 12), 0, False)]
    t_shapes = [tuple(c.shape) for c in _cores((64, 1, 12), (64, 1, 12), 0, False)]
    pairs = constraint.pair_layers({"layer.0.q": s_shapes}, {"layer.1.q": t_shapes},
                                   lambda n: layers.partner_name(n, layers.layer_map(None, 1, 2)))
    assert pairs[0].cores == (2,) and pairs[0].skipped == (0,)
    with pytest.raises(Exception):
        constraint.tensor_constraint_loss({"layer.0.q": []}, {"layer.1.q": []},
                                      [constraint.AlignedPair("layer.0.q", "layer.1.q", (), (0, 2))])

"""The MPO math core against the paper's reference figures and exact identities."""

import math

import pytest
import torch

from tdkd_cli.tensor import mpo
from tdkd_cli.core.errors import UsageError

BERT_SHAPES = {768: (32, 1, 1, 1, 24), 3072: (64, 1, 1, 1, 48)}


@pytest.mark.parametrize("dim,n,expected", [
    (768, 5, (32, 1, 1, 1, 24)),
    (3072, 5, (64, 1, 1, 1, 48)),
    (768, 3, (32, 1, 24)),
    (312, 4, (24, 1, 1, 13)),
    (7, 2, (7, 1)),
])
def test_planner_picks_paper_shapes(dim, n, expected):
    assert mpo.plan_factors(dim, n) == expected


def test_paper_parameter_counts_at_n5():
    s768, s3072 = BERT_SHAPES[768], BERT_SHAPES[3072]
    assert mpo.num_params(s768, s768, mpo.full_bonds(s768, s768)) == 1_916_928
    assert mpo.num_params(s3072, s768, mpo.full_bonds(s3072, s768)) == 7_667_712
    assert mpo.num_params(s768, s3072, mpo.full_bonds(s768, s3072)) == 7_667_712


def test_bond_formula_general_shape():
    out_s, in_s = (8, 2, 2, 2, 2, 6), (4, 2, 2, 2, 2, 6)
    sizes = [a * b for a, b in zip(out_s, in_s)]
    bonds = mpo.full_bonds(out_s, in_s)
    assert bonds[0] == bonds[-1] == 1
    for k in range(1, 6):
        assert bonds[k] == min(math.prod(sizes[:k]), math.prod(sizes[k:]))


@pytest.mark.parametrize("out_s,in_s", [
    ((32, 1, 1, 1, 24), (32, 1, 1, 1, 24)),
    ((8, 2, 2, 2, 2, 6), (4, 2, 2, 2, 2, 6)),
    ((1, 4, 1, 12), (2, 2, 12, 1)),
    ((24, 1, 13), (40, 1, 30)),
])
def test_lossless_roundtrip(out_s, in_s, rng):
    w = torch.randn(math.prod(out_s), math.prod(in_s), generator=rng, dtype=torch.float64)
    cores = mpo.decompose(w, out_s, in_s)
    assert [tuple(c.shape) for c in cores] == mpo.core_shapes(out_s, in_s, mpo.full_bonds(out_s, in_s))
    assert mpo.relative_error(mpo.contract(cores), w) < 1e-13
    cores32 = mpo.decompose(w.float(), out_s, in_s)
    assert all(c.dtype == torch.float32 for c in cores32)
    assert mpo.relative_error(mpo.contract(cores32), w) < 1e-6


def test_3072x768_paper_shapes_float32(rng):
    w = torch.randn(3072, 768, generator=rng) * 0.02
    cores = mpo.decompose(w, BERT_SHAPES[3072], BERT_SHAPES[768])
    assert sum(c.numel() for c in cores) == 7_667_712
    assert mpo.relative_error(mpo.contract(cores), w) < 1e-6


@pytest.mark.parametrize("out_s,in_s", [
    ((16, 1, 1, 1, 12), (8, 1, 1, 1, 6)),
    ((8, 2, 2, 3), (4, 2, 3, 2)),
    ((1, 4, 1, 12), (2, 2, 12, 1)),
])
def test_gauge_is_balanced_at_every_bond(out_s, in_s, rng):
    """PAPER §2: at each bond A_k^T A_k = Λ_k = B_k B_k^T, Λ_k the singular values of that cut."""
    w = torch.randn(math.prod(out_s), math.prod(in_s), generator=rng, dtype=torch.float64)
    cores = mpo.decompose(w, out_s, in_s)
    n = len(out_s)
    interleaved = w.reshape(*out_s, *in_s).permute([i for k in range(n) for i in (k, n + k)])
    for k in range(1, n):
        a, b = mpo.bond_halves(cores, k)
        ata, bbt = a.T @ a, b @ b.T
        cut = interleaved.reshape(math.prod(interleaved.shape[: 2 * k]), -1)
        sv = torch.linalg.svdvals(cut)[: ata.shape[0]]
        assert torch.allclose(ata, torch.diag(sv), atol=1e-10 * float(sv[0]))
        assert torch.allclose(bbt, torch.diag(sv), atol=1e-10 * float(sv[0]))


def test_singleton_middle_cores_are_signed_identities(rng):
    w = torch.randn(96, 48, generator=rng, dtype=torch.float64)
    cores = mpo.decompose(w, (16, 1, 1, 1, 6), (8, 1, 1, 1, 6))
    for c in cores[1:-1]:
        m = c.reshape(c.shape[0], c.shape[3])
        assert torch.allclose(m.abs(), torch.eye(m.shape[0], dtype=m.dtype), atol=1e-10)
    assert mpo.central_index(5) == 2 and mpo.central_index(4) == 1 and mpo.central_index(3) == 1


def test_rank_deficient_and_zero_matrices(rng):
    low = torch.randn(96, 3, generator=rng, dtype=torch.float64) @ torch.randn(3, 64, generator=rng, dtype=torch.float64)
    for out_s, in_s in [((4, 1, 24), (4, 1, 16)), ((4, 2, 3, 4), (4, 2, 2, 4))]:
        assert mpo.relative_error(mpo.contract(mpo.decompose(low, out_s, in_s)), low) < 1e-12
    zero = torch.zeros(48, 48)
    assert float(mpo.contract(mpo.decompose(zero, (4, 1, 12), (4, 1, 12))).abs().max()) == 0.0


def test_truncation_lowers_params_and_error_grows_as_chi_shrinks(rng):
    w = torch.randn(256, 256, generator=rng, dtype=torch.float64)
    shapes = ((4, 4, 4, 4), (4, 4, 4, 4))
    params, errors = [], []
    for chi in (None, 128, 64, 16, 4):
        cores = mpo.decompose(w, *shapes, rank=chi)
        assert max(c.shape[-1] for c in cores) <= (chi or 10**9)
        params.append(sum(c.numel() for c in cores))
        errors.append(mpo.relative_error(mpo.contract(cores), w))
    assert errors[0] < 1e-12
    assert all(p1 > p2 for p1, p2 in zip(params, params[1:]))
    assert all(e1 < e2 for e1, e2 in zip(errors, errors[1:]))


def test_contraction_orders_agree_and_optimal_is_cheaper(rng):
    w = torch.randn(384, 192, generator=rng, dtype=torch.float64)
    out_s, in_s = (16, 1, 1, 1, 24), (16, 1, 1, 1, 12)
    cores = mpo.decompose(w, out_s, in_s)
    assert torch.allclose(mpo.contract(cores, "left"), mpo.contract(cores, "optimal"), atol=1e-12)
    sizes = [a * b for a, b in zip(BERT_SHAPES[3072], BERT_SHAPES[768])]
    bonds = mpo.full_bonds(BERT_SHAPES[3072], BERT_SHAPES[768])
    assert mpo.contraction_cost(bonds, sizes, "optimal") < mpo.contraction_cost(bonds, sizes, "left")


def test_contraction_is_differentiable(rng):
    w = torch.randn(24, 20, generator=rng, dtype=torch.float64)
    cores = [c.requires_grad_() for c in mpo.decompose(w, (4, 1, 6), (5, 1, 4))]
    mpo.contract(cores).sum().backward()
    assert all(c.grad is not None and float(c.grad.abs().sum()) > 0 for c in cores)


def test_tensorly_reconstructs_tdkd_cores(rng):
    import tensorly as tl
    from tensorly.tt_matrix import tt_matrix_to_matrix

    w = torch.randn(48, 40, generator=rng, dtype=torch.float64)
    cores = mpo.decompose(w, (4, 2, 6), (2, 5, 4))
    rebuilt = tt_matrix_to_matrix([c.numpy() for c in cores])
    assert rebuilt.shape == (48, 40)
    assert abs(tl.to_numpy(rebuilt) - w.numpy()).max() < 1e-12


@pytest.mark.parametrize("call", [
    lambda: mpo.plan_factors(768, 1),
    lambda: mpo.check_factors(768, (32, 1, 1, 1, 25)),
    lambda: mpo.check_factors(768, (768,)),
    lambda: mpo.full_bonds((2, 2), (2, 2, 1)),
    lambda: mpo.full_bonds((2, 2), (2, 2), rank=0),
    lambda: mpo.decompose(torch.zeros(4, 4), (2, 2), (4, 2)),
])
def test_bad_shapes_raise_usage_errors(call):
    with pytest.raises(UsageError):
        call()


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
@pytest.mark.parametrize("condition", [10.0, 1e8])
def test_svd_by_gram_matches_lapack_and_falls_back_when_ill_conditioned(shape, condition, rng):
    """mpo._svd: the Gram-eigh route (well-conditioned) and the LAPACK fallback (kappa above
    GRAM_MAX_CONDITION) both give orthonormal factors, the true singular values and the matrix."""
    k = min(shape)
    q1, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=rng, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=rng, dtype=torch.float64))
    sv = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    m = (q1 * sv) @ q2.T
    u, s, vh = mpo._svd(m)
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(u.T @ u, eye, atol=1e-9) and torch.allclose(vh @ vh.T, eye, atol=1e-12)
    assert torch.allclose(s, sv, rtol=1e-9, atol=1e-15)
    assert mpo.relative_error((u * s) @ vh, m) < 1e-13


def test_bond_spectra_are_the_singular_values_of_each_cut(rng):
    out_s, in_s = (4, 2, 3), (3, 2, 4)
    w = torch.randn(24, 24, generator=rng, dtype=torch.float64)
    cores = mpo.decompose(w, out_s, in_s)
    cores = [c + 0.01 * torch.randn(c.shape, generator=rng, dtype=torch.float64) for c in cores]  # "trained": no gauge
    spectra = mpo.bond_spectra(cores)
    full = mpo.contract(cores).reshape(*out_s, *in_s).permute(0, 3, 1, 4, 2, 5)
    for k, sv in enumerate(spectra, start=1):
        cut = full.reshape(math.prod(full.shape[: 2 * k]), -1)
        expected = torch.linalg.svdvals(cut)[: sv.numel()]
        assert torch.allclose(sv, expected, rtol=1e-10, atol=1e-12)

"""Matrix product operator (MPO, tensor-train matrix) math as pure functions.

A weight W of shape (out, in) with out = prod(i_1..i_n) and in = prod(j_1..j_n) is written as
n cores; core k has shape (d_{k-1}, i_k, j_k, d_k) with d_0 = d_n = 1 (tensorly's TT-matrix
layout), and

    W[(i_1..i_n), (j_1..j_n)] = sum_a core_1[1,i_1,j_1,a_1] core_2[a_1,i_2,j_2,a_2] ... core_n[a_{n-1},i_n,j_n,1]

Decomposition is TT-SVD followed by the balanced canonical gauge (at every bond the left and right
halves carry the square roots of that cut's singular values). All decomposition math runs in
float64; each SVD goes through the eigendecomposition of the smaller Gram matrix when the matrix is
well-conditioned (about half LAPACK's SVD time; ``_svd``); cores are returned in the dtype asked for. Contraction follows the cheapest pairwise order
found by dynamic programming over the chain (the plain left-to-right order is available for
comparison).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from ..core.errors import UsageError

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
def central_index(n: int) -> int:
    """0-based index of the central tensor: floor((n-1)/2). All other cores are auxiliary."""
    return (n - 1) // 2


def plan_factors(dim: int, n: int) -> Shape:
    """Paper-style factor shape [a, 1, ..., 1, b] with a*b = dim, a >= b and b as large as possible
    (768 -> [32,1,1,1,24], 3072 -> [64,1,1,1,48] at n=5)."""
    if n < 2:
        raise UsageError(f"n must be at least 2 (got {n})")
    if dim < 1:
        raise UsageError(f"cannot factor dimension {dim}")
    b = 1
    for cand in range(int(math.isqrt(dim)), 0, -1):
        if dim % cand == 0:
            b = cand
            break
    return (dim // b,) + (1,) * (n - 2) + (b,)


def check_factors(dim: int, factors: Sequence[int], what: str = "dimension") -> Shape:
    factors = tuple(int(f) for f in factors)
    if len(factors) < 2:
        raise UsageError(f"factor shape {list(factors)} for {what} {dim} needs at least 2 factors")
    if any(f < 1 for f in factors):
        raise UsageError(f"factor shape {list(factors)} for {what} {dim} has a factor below 1")
    if math.prod(factors) != dim:
        raise UsageError(
            f"factor shape {list(factors)} multiplies to {math.prod(factors)}, not the {what} {dim}"
        )
    return factors


def full_bonds(out_shape: Sequence[int], in_shape: Sequence[int], rank: int | None = None) -> list[int]:
    """Bond dimensions d_0..d_n: d_k = min(prod_{m<=k} i_m j_m, prod_{m>k} i_m j_m), capped by rank."""
    if len(out_shape) != len(in_shape):
        raise UsageError(f"factor shapes {list(out_shape)} and {list(in_shape)} differ in length")
    if rank is not None and rank < 1:
        raise UsageError(f"rank (chi) must be at least 1 (got {rank})")
    sizes = [i * j for i, j in zip(out_shape, in_shape)]
    n = len(sizes)
    bonds = [1]
    for k in range(1, n):
        d = min(math.prod(sizes[:k]), math.prod(sizes[k:]))
        bonds.append(d if rank is None else min(d, rank))
    bonds.append(1)
    return bonds


def core_shapes(out_shape: Sequence[int], in_shape: Sequence[int], bonds: Sequence[int]) -> list[Shape]:
    return [(bonds[k], out_shape[k], in_shape[k], bonds[k + 1]) for k in range(len(out_shape))]


def num_params(out_shape: Sequence[int], in_shape: Sequence[int], bonds: Sequence[int]) -> int:
    """Parameter count sum_k d_{k-1} i_k j_k d_k."""
    return sum(math.prod(s) for s in core_shapes(out_shape, in_shape, bonds))


# ----------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------
def _interleave_perm(n: int) -> list[int]:
    perm = []
    for k in range(n):
        perm += [k, n + k]
    return perm


# Largest condition number s_max / s_min for which the Gram route is used: the singular vectors it
# gives are orthonormal to about eps * kappa^2 (< 1e-7 in float64 below this bound).
GRAM_MAX_CONDITION = 1e4


def _svd(m: torch.Tensor):
    """Thin SVD (u, s, vh) of a float64 matrix, s descending.

    Fast route: eigendecomposition of the smaller Gram matrix (G = A^T A for a tall A), about half
    the time of LAPACK's SVD. s_i = ||A v_i|| and u_i = A v_i / s_i, so u diag(s) vh = A V V^T
    reproduces A to rounding whatever the conditioning (V is orthonormal to machine precision);
    only u's orthonormality degrades, as eps * kappa^2. When the matrix is ill-conditioned
    (kappa > GRAM_MAX_CONDITION, rank deficient included) the plain SVD is used instead."""
    tall = m.shape[0] >= m.shape[1]
    a = m if tall else m.T
    _, v = torch.linalg.eigh(a.T @ a)
    av = a @ v.flip(1)
    s = torch.linalg.vector_norm(av, dim=0)
    if s.numel() == 0 or not bool(s.min() * GRAM_MAX_CONDITION > s.max()):
        return torch.linalg.svd(m, full_matrices=False)
    v = v.flip(1)
    if not bool((s[:-1] >= s[1:]).all()):  # norms out of the eigenvalues' order (near-equal values)
        order = torch.argsort(s, descending=True)
        s, av, v = s[order], av[:, order], v[:, order]
    u = av.div_(s)
    return (u, s, v.T) if tall else (v, s, u.T)


def _inv_sqrt(s: torch.Tensor) -> torch.Tensor:
    """s^{-1/2} with singular values at round-off level mapped to 0 (their directions carry no weight)."""
    if s.numel() == 0:
        return s
    tol = s.max() * max(s.numel(), 1) * torch.finfo(s.dtype).eps
    out = torch.zeros_like(s)
    keep = s > tol
    out[keep] = s[keep].rsqrt()
    return out


def decompose(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    rank: int | None = None,
    *,
    gauge: bool = True,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Decompose ``weight`` (out, in) into MPO cores (d_{k-1}, i_k, j_k, d_k).

    TT-SVD left to right (optionally truncated to ``rank``), then, if ``gauge``, a right-to-left
    SVD sweep that yields every bond's singular values Λ_k and the balanced cores

        C_1 = L_1 U_1 Λ_1^{1/2},  C_k = Λ_{k-1}^{-1/2} U_{k-1}^T L_k U_k Λ_k^{1/2},  C_n = Λ_{n-1}^{1/2} V_{n-1}^T

    (L_k: left-orthonormal TT-SVD cores; U_k, V_k: singular vectors of the bond-k sweep step), so
    that at every bond k the product of cores 1..k is A_k = X_k Λ_k^{1/2} and of cores k+1..n is
    B_k = Λ_k^{1/2} Y_k^T with orthonormal X_k, Y_k: A_k^T A_k = Λ_k = B_k B_k^T.
    """
    out_shape = tuple(int(x) for x in out_shape)
    in_shape = tuple(int(x) for x in in_shape)
    if weight.dim() != 2:
        raise UsageError(f"can only decompose a matrix, got a tensor of shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    check_factors(out_f, out_shape, "output dimension")
    check_factors(in_f, in_shape, "input dimension")
    n = len(out_shape)
    if len(in_shape) != n:
        raise UsageError(f"factor shapes {list(out_shape)} and {list(in_shape)} differ in length")
    target = full_bonds(out_shape, in_shape, rank)
    out_dtype = dtype or weight.dtype
    w = weight.detach()
    sizes = [i * j for i, j in zip(out_shape, in_shape)]
    # interleaved (i_1 j_1 ... i_n j_n) tensor in float64, converted and permuted in one copy
    view = w.reshape(*out_shape, *in_shape).permute(_interleave_perm(n))
    t = torch.empty(view.shape, dtype=torch.float64, device=w.device).copy_(view).reshape(-1)

    # TT-SVD: left-orthonormal cores L_1..L_{n-1}, remainder diag(s_rem) vh_rem in the last core.
    # A remainder diag(s) Vh (s sorted, Vh with orthonormal rows) is already its own SVD, so a
    # singleton mode (i_k = j_k = 1) needs no new SVD: its core is the identity. For the paper's
    # shapes [a,1,..,1,b] this leaves a single SVD per matrix.
    left: list[torch.Tensor] = []
    identity = [False] * n
    s_rem = torch.ones(1, dtype=torch.float64, device=w.device)
    vh_rem = t.reshape(1, -1)
    d_prev = 1
    for k in range(n - 1):
        if k > 0 and sizes[k] == 1 and target[k + 1] >= d_prev:
            left.append(torch.eye(d_prev, dtype=torch.float64, device=w.device).reshape(d_prev, 1, d_prev))
            identity[k] = True
            vh_rem = vh_rem.reshape(d_prev, -1)
            continue
        m = (vh_rem if k == 0 else s_rem[:, None] * vh_rem).reshape(d_prev * sizes[k], -1)
        u, s, vh = _svd(m)
        r = min(target[k + 1], s.numel())
        u, s, vh = u[:, :r], s[:r], vh[:r]
        left.append(u.reshape(d_prev, sizes[k], r))
        s_rem, vh_rem = s, vh
        d_prev = r
    if not gauge:
        cores = left + [(s_rem[:, None] * vh_rem).reshape(d_prev, sizes[-1], 1)]
    else:
        # Right-to-left sweep. At bond b (between cores b and b+1) we need an SVD U_b Λ_b V_b^T of
        # the carried core b+1; for the last bond that is (I, s_rem, vh_rem) from TT-SVD, and after
        # an identity core it is (U, Λ, I) of the bond to its right.
        us: list[torch.Tensor] = [None] * (n - 1)  # type: ignore[list-item]
        ss: list[torch.Tensor] = [None] * (n - 1)  # type: ignore[list-item]
        eye = u = torch.eye(d_prev, dtype=torch.float64, device=w.device)
        s = s_rem
        vh_last = vh_rem.reshape(d_prev, sizes[-1], 1)
        for b in range(n - 2, -1, -1):
            us[b], ss[b] = u, s
            if b == 0:
                break
            if identity[b]:
                continue
            cur = torch.einsum("asb,bc->asc", left[b], u * s)
            u, s, _ = _svd(cur.reshape(cur.shape[0], -1))
        cores = []
        for k in range(n):
            if k == 0 and us[0] is eye:  # bond 0's U is still the identity: only the scaling remains
                c = left[0].mul_(ss[0].sqrt())  # in place: left[0] is not read again
            elif k == 0:
                c = torch.einsum("asb,bc->asc", left[0], us[0] * ss[0].sqrt())
            elif k == n - 1:
                c = ss[n - 2].sqrt()[:, None, None] * vh_last
            elif identity[k] and us[k - 1] is us[k]:
                c = left[k]  # Λ^{-1/2} U^T I U Λ^{1/2} = I exactly
            else:
                lhs = _inv_sqrt(ss[k - 1])[:, None] * us[k - 1].T
                c = torch.einsum("ab,bsc,cd->asd", lhs, left[k], us[k] * ss[k].sqrt())
            cores.append(c)

    return [
        c.reshape(c.shape[0], out_shape[k], in_shape[k], c.shape[-1]).to(out_dtype).contiguous()
        for k, c in enumerate(cores)
    ]


# ----------------------------------------------------------------------------------------------
# Contraction
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _optimal_plan(bonds: tuple[int, ...], sizes: tuple[int, ...]):
    """Matrix-chain style DP. Block [a..b] is a (d_a, prod sizes[a..b], d_{b+1}) tensor; merging
    [a..m] with [m+1..b] costs d_a * P(a,m) * d_{m+1} * P(m+1,b) * d_{b+1} multiply-adds."""
    n = len(sizes)
    prefix = [1]
    for s in sizes:
        prefix.append(prefix[-1] * s)

    def p(a, b):
        return prefix[b + 1] // prefix[a]

    cost = [[0] * n for _ in range(n)]
    split = [[-1] * n for _ in range(n)]
    for length in range(2, n + 1):
        for a in range(n - length + 1):
            b = a + length - 1
            best, arg = None, -1
            for m in range(a, b):
                c = cost[a][m] + cost[m + 1][b] + bonds[a] * p(a, m) * bonds[m + 1] * p(m + 1, b) * bonds[b + 1]
                if best is None or c < best:
                    best, arg = c, m
            cost[a][b], split[a][b] = best, arg
    return cost[0][n - 1], tuple(tuple(row) for row in split)


def contraction_cost(bonds: Sequence[int], sizes: Sequence[int], order: str = "optimal") -> int:
    """Multiply-adds to contract the chain in the given order ("optimal" or "left")."""
    bonds, sizes = tuple(bonds), tuple(sizes)
    if order == "optimal":
        return _optimal_plan(bonds, sizes)[0]
    total, acc = 0, sizes[0]
    for k in range(1, len(sizes)):
        total += bonds[0] * acc * bonds[k] * sizes[k] * bonds[k + 1]
        acc *= sizes[k]
    return total


def _merge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dl, p1, dm = x.shape
    _, p2, dr = y.shape
    return (x.reshape(dl * p1, dm) @ y.reshape(dm, p2 * dr)).reshape(dl, p1 * p2, dr)


def contract(cores: Sequence[torch.Tensor], order: str = "optimal") -> torch.Tensor:
    """Contract cores (d_{k-1}, i_k, j_k, d_k) back to the dense (prod i, prod j) matrix.

    Differentiable; runs in the cores' dtype and device. ``order`` is "optimal" (cheapest pairwise
    order, computed once per shape) or "left" (left to right)."""
    n = len(cores)
    out_shape = [c.shape[1] for c in cores]
    in_shape = [c.shape[2] for c in cores]
    flat = [c.reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3]) for c in cores]
    if order == "left":
        acc = flat[0]
        for c in flat[1:]:
            acc = _merge(acc, c)
    elif order == "optimal":
        bonds = tuple([c.shape[0] for c in cores] + [cores[-1].shape[3]])
        sizes = tuple(c.shape[1] for c in flat)
        split = _optimal_plan(bonds, sizes)[1]

        def block(a, b):
            if a == b:
                return flat[a]
            m = split[a][b]
            return _merge(block(a, m), block(m + 1, b))

        acc = block(0, n - 1)
    else:
        raise UsageError(f"unknown contraction order {order!r} (use 'optimal' or 'left')")
    inv = [2 * k for k in range(n)] + [2 * k + 1 for k in range(n)]
    full = acc.reshape([d for pair in zip(out_shape, in_shape) for d in pair]).permute(inv)
    return full.reshape(math.prod(out_shape), math.prod(in_shape))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative Frobenius error ||approx - exact|| / ||exact|| computed in float64."""
    exact64 = exact.detach().to(torch.float64)
    diff = approx.detach().to(torch.float64) - exact64
    denom = torch.linalg.norm(exact64)
    if float(denom) == 0.0:
        return float(torch.linalg.norm(diff))
    return float(torch.linalg.norm(diff) / denom)


def bond_halves(cores: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At bond k (1..n-1) return A_k (prod of the left cores' row indices, d_k) and
    B_k (d_k, prod of the right cores' indices), in float64."""
    c64 = [c.to(torch.float64) for c in cores]
    flat = [c.reshape(c.shape[0], -1, c.shape[3]) for c in c64]
    acc = flat[0]
    for c in flat[1:k]:
        acc = _merge(acc, c)
    right = flat[k]
    for c in flat[k + 1:]:
        right = _merge(right, c)
    return acc.reshape(-1, acc.shape[-1]), right.reshape(right.shape[0], -1)


def bond_spectra(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values (descending, float64) of the matrix at each bond k = 1..n-1: rows are the
    indices of cores 1..k, columns those of cores k+1..n. For cores in the balanced gauge they are
    the Λ_k of ``decompose``; for trained cores, what training made of them. From the bond halves
    by QR, so only a (d_k x d_k) matrix is decomposed."""
    out = []
    for k in range(1, len(cores)):
        a, b = bond_halves(cores, k)
        ra = torch.linalg.qr(a, mode="r")[1] if a.shape[0] > a.shape[1] else a
        rb = torch.linalg.qr(b.T, mode="r")[1] if b.shape[1] > b.shape[0] else b.T
        out.append(torch.linalg.svdvals(ra @ rb.T))
    return out


# ----------------------------------------------------------------------------------------------
# Factor shapes for student/teacher alignment (tensor constraint)
# ----------------------------------------------------------------------------------------------
def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def _edge_shape(dim: int, b: int, n: int) -> Shape:
    return (dim // b,) + (1,) * (n - 2) + (b,)


def _aux_matches(a: list[Shape], b: list[Shape]) -> int:
    c = central_index(len(a))
    return sum(1 for k in range(len(a)) if k != c and a[k] == b[k])


def align_plans(student_dims: tuple[int, int], teacher_dims: tuple[int, int], n: int,
                student_shapes: tuple[Shape, Shape] | None = None,
                kernels: tuple[int, int] = (1, 1)) -> tuple[tuple[Shape, Shape], tuple[Shape, Shape]]:
    """Factor shapes ((out, in) for the student, (out, in) for the teacher) that make as many
    auxiliary cores as possible identical in shape, so the tensor constraint can align them.

    ``*_dims`` are (out, in) channel counts; ``kernels`` the kernel-window sizes (kh*kw, 1 for a
    Linear) of student and teacher, folded into the trailing input factor of each side.
    Equal dimensions: the default [a,1..1,b] plan on both sides (every core aligns). Different
    widths: [a,1..1,b] shapes whose trailing factors b are common divisors of both sides, chosen to
    maximise the aligned auxiliary cores, then the largest trailing block. ``student_shapes`` fixes
    the student's side (an already-decomposed student) and searches the teacher's only."""
    (so, si), (to, ti) = student_dims, teacher_dims
    ks, kt = kernels

    def side(o: int, i: int, bo: int, bi: int, k: int) -> tuple[Shape, Shape]:
        shape_in = _edge_shape(i, bi, n)
        return _edge_shape(o, bo, n), shape_in[:-1] + (shape_in[-1] * k,)

    def cores(shapes: tuple[Shape, Shape]) -> list[Shape]:
        return core_shapes(*shapes, full_bonds(*shapes))

    if (so, si, ks) == (to, ti, kt):
        if student_shapes is not None:
            return student_shapes, student_shapes
        fo, fi = plan_factors(so, n), plan_factors(si, n)
        plan = side(so, si, fo[-1], fi[-1], ks)
        return plan, plan
    if student_shapes is not None:
        s_cores = cores(student_shapes)
        best, best_key = None, None
        for bo in _divisors(to):
            for bi in _divisors(ti):
                t = side(to, ti, bo, bi, kt)
                key = (_aux_matches(s_cores, cores(t)), min(bo, to // bo) * min(bi, ti // bi))
                if best_key is None or key > best_key:
                    best, best_key = t, key
        return student_shapes, best
    best, best_key = None, None
    for bo in _divisors(math.gcd(so, to)):
        for bi in _divisors(math.gcd(si, ti)):
            s, t = side(so, si, bo, bi, ks), side(to, ti, bo, bi, kt)
            key = (_aux_matches(cores(s), cores(t)), bo * bi)
            if best_key is None or key > best_key:
                best, best_key = (s, t), key
    return best

"""The losses of the distillation methods (methods.py registers them), each the formula of its
paper written out. Student tensors carry gradients; teacher tensors are detached here, so a
method can never train the teacher. Features are (batch, ...) tensors: token features
(batch, tokens, width), feature maps (batch, channels, height, width) or vectors (batch, width).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): T^2 (alpha * TCKD + beta * NCKD), batch mean.
    TCKD = KL(b_t || b_s) of the binary (target, all other classes) probabilities; NCKD = KL of the
    distributions over the non-target classes alone; all at temperature T."""
    t = temperature
    zs, zt = student_logits.float() / t, teacher_logits.detach().float() / t
    target = F.one_hot(labels, zs.shape[-1]).bool()
    ps, pt = zs.softmax(-1), zt.softmax(-1)
    bs = torch.stack([ps[target], 1 - ps[target]], -1).clamp_min(1e-12)
    bt = torch.stack([pt[target], 1 - pt[target]], -1).clamp_min(1e-12)
    tckd = (bt * (bt.log() - bs.log())).sum(-1).mean()
    log_qs = zs.masked_fill(target, -1e9).log_softmax(-1)
    log_qt = zt.masked_fill(target, -1e9).log_softmax(-1)
    nckd = (log_qt.exp() * (log_qt - log_qs)).masked_fill(target, 0.0).sum(-1).mean()
    return (t * t) * (alpha * tckd + beta * nckd)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): T^2 (beta * inter + gamma * intra) with
    inter = 1 - mean over examples of the Pearson correlation of the softened predictions, and
    intra = 1 - mean over classes of the Pearson correlation across the batch."""
    t = temperature
    ys, yt = (student_logits.float() / t).softmax(-1), (teacher_logits.detach().float() / t).softmax(-1)
    inter = 1 - _pearson_rows(ys, yt).mean()
    intra = 1 - _pearson_rows(ys.T, yt.T).mean()
    return (t * t) * (beta * inter + gamma * intra)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(x.shape[0], -1)


def sp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): ||G_s - G_t||_F^2 / B^2, where G is the
    batch Gram matrix of the flattened features with each row scaled to unit L2 norm."""
    fs, ft = _flat(student_feat), _flat(teacher_feat.detach())
    gs, gt = F.normalize(fs @ fs.T, dim=1), F.normalize(ft @ ft.T, dim=1)
    b = fs.shape[0]
    return ((gs - gt) ** 2).sum() / (b * b)


def _distances(f: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances divided by their mean over distinct pairs."""
    d = torch.cdist(f, f)
    off = ~torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    return d / d[off].mean().clamp_min(1e-12)


def _angles(f: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between examples i and k: <e_ij, e_kj> for unit vectors e_ij = (f_i - f_j)/|.|."""
    e = F.normalize(f.unsqueeze(0) - f.unsqueeze(1), p=2, dim=2)  # e[j, i] = unit(f_i - f_j)
    return torch.bmm(e, e.transpose(1, 2))  # [j, i, k]


def rkd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al., CVPR 2019): Huber loss between the distance-wise potentials
    (pairwise distances over their mean) plus the angle-wise potentials (cosines of the angles
    formed by every triplet) of student and teacher features, weighted."""
    fs, ft = _flat(student_feat), _flat(teacher_feat.detach())
    loss = distance_weight * F.smooth_l1_loss(_distances(fs), _distances(ft))
    return loss + angle_weight * F.smooth_l1_loss(_angles(fs), _angles(ft))


def fitnet_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hints (FitNets, Romero et al., ICLR 2015): mean squared error between the student feature
    (already passed through its connector) and the teacher feature. ``mask`` (batch, tokens)
    restricts the mean to real tokens of token features."""
    diff = (student_feat.float() - teacher_feat.detach().float()) ** 2
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).unsqueeze(-1)
    return (diff * m).sum() / (m.sum() * diff.shape[-1]).clamp_min(1.0)


def spatial_attention(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(batch, positions) attention map of a feature: |F|^p summed over channels at each position
    (channels are dim 1 of a feature map, the last dim of token features), L2-normalised per example."""
    f = feat.float()
    if f.ndim == 4:
        q = f.abs().pow(p).sum(1).flatten(1)
    elif f.ndim == 3:
        q = f.abs().pow(p).sum(-1)
    else:
        raise ValueError(f"attention transfer needs features with positions, got shape {list(f.shape)}")
    return F.normalize(q, dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): squared L2 distance between the
    normalised spatial attention maps of student and teacher, mean over the batch."""
    a_s, a_t = spatial_attention(student_feat, p), spatial_attention(teacher_feat.detach(), p)
    return ((a_s - a_t) ** 2).sum(1).mean()


def _relation_log_probs(a: torch.Tensor, b: torch.Tensor, heads: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """log softmax(A_h B_h^T / sqrt(d_h)) per relation head: (batch, heads, tokens, tokens), where
    A_h, B_h are the h-th of ``heads`` equal slices of the last dim of (batch, tokens, width) inputs."""
    bsz, n, width = a.shape
    d = width // heads
    ah = a.float().reshape(bsz, n, heads, d).transpose(1, 2)
    bh = b.float().reshape(bsz, n, heads, d).transpose(1, 2)
    scores = ah @ bh.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return scores.log_softmax(-1)


def relation_kl(student: tuple, teacher: tuple, heads: tuple[int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(R_teacher || R_student) of self-attention relations R = softmax(A B^T / sqrt(d_h)), where
    ``student``/``teacher`` are (A, B) pairs of (batch, tokens, width) projections split into
    ``heads`` (student, teacher) relation heads; summed over keys, mean over batch, heads and
    (real) query tokens. MiniLM (Wang et al., NeurIPS 2020): (queries, keys) give the attention
    distributions, (values, values) the value relation."""
    ls = _relation_log_probs(*student, heads[0], mask)
    lt = _relation_log_probs(*(x.detach() for x in teacher), heads[1], mask)
    kl = (lt.exp() * (lt - ls)).nan_to_num(0.0).sum(-1)  # masked keys: 0 * (-inf) terms
    if mask is None:
        return kl.mean()
    rows = mask.to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * rows).sum() / rows.sum().clamp_min(1.0)


def cc_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Correlation congruence (Peng et al., ICCV 2019): squared Frobenius distance, over B^2,
    between the batch correlation matrices of student and teacher, each the Gaussian kernel
    exp(-gamma ||f_i - f_j||^2) of L2-normalised features, approximated by its Taylor series
    sum_{p=0..order} exp(-2 gamma) (2 gamma)^p / p! (f_i . f_j)^p."""
    def corr(f):
        f = F.normalize(_flat(f), dim=1)
        sim = f @ f.T
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim ** p for p in range(int(order) + 1))
    cs, ct = corr(student_feat), corr(teacher_feat.detach())
    return ((cs - ct) ** 2).sum() / cs.shape[0] ** 2


# ----------------------------------------------------------------------------------------------
# Online KD: the students teach each other (the "teacher" side of each KL is detached)
# ----------------------------------------------------------------------------------------------
def _soft_kl(student_logits: torch.Tensor, target_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 KL(softmax(target / T) || softmax(student / T)), batch mean; the target is detached."""
    log_ps = F.log_softmax(student_logits.float() / t, -1)
    log_pt = F.log_softmax(target_logits.detach().float() / t, -1)
    return (t * t) * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def dml_loss(peer_logits: list[torch.Tensor], labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Deep mutual learning (Zhang et al., CVPR 2018) for a cohort of K peers:
    sum_k [ CE(z_k, y) + 1/(K-1) sum_{j != k} T^2 KL(p_j || p_k) ], p = softmax(z / T), each p_j
    detached: peer k's gradient is that of its own DML loss, as if the peers were updated in turn
    from the same predictions."""
    k_peers = len(peer_logits)
    total = peer_logits[0].new_zeros((), dtype=torch.float32)
    for k, zk in enumerate(peer_logits):
        mimic = sum(_soft_kl(zk, zj, temperature) for j, zj in enumerate(peer_logits) if j != k) / (k_peers - 1)
        total = total + F.cross_entropy(zk.float(), labels) + mimic
    return total


def one_ensemble(branch_logits: list[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """The gated ensemble of ONE: z_e = sum_b g_b z_b, ``gate`` (batch, branches) summing to 1."""
    return (gate.float().unsqueeze(-1) * torch.stack([z.float() for z in branch_logits], 1)).sum(1)


def one_loss(branch_logits: list[torch.Tensor], gate: torch.Tensor, labels: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """ONE, on-the-fly native ensemble (Lan et al., NeurIPS 2018):
    sum_b CE(z_b, y) + CE(z_e, y) + sum_b T^2 KL(p_e || p_b), z_e the gated ensemble; the
    ensemble is detached in the KL (it teaches the branches; CE(z_e) trains it and the gate)."""
    ens = one_ensemble(branch_logits, gate)
    total = F.cross_entropy(ens, labels)
    for z in branch_logits:
        total = total + F.cross_entropy(z.float(), labels) + _soft_kl(z, ens, temperature)
    return total


def _neighbour_log_probs(feat: torch.Tensor, edge_index: torch.Tensor, kernel: str) -> torch.Tensor:
    """log LS_ij for every edge (i <- j): node i's softmax over its neighbours j of SIM(z_i, z_j)."""
    src, dst = edge_index[1], edge_index[0]  # the distribution of node dst over its neighbours src
    zi, zj = feat[dst].float(), feat[src].float()
    if kernel == "linear":
        sim = (zi * zj).sum(-1)
    elif kernel == "poly":
        sim = ((zi * zj).sum(-1) + 1.0) ** 2
    else:  # rbf: exp(-||z_i - z_j||^2), so SIM is the negative squared distance
        sim = -(zi - zj).pow(2).sum(-1)
    n = feat.shape[0]
    top = torch.full((n,), float("-inf"), device=sim.device).scatter_reduce(0, dst, sim.detach(), "amax")
    shifted = sim - top[dst]
    norm = torch.zeros(n, device=sim.device).index_add(0, dst, shifted.exp())
    return shifted - norm[dst].log()


def lsp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, edge_index: torch.Tensor,
             kernel: str = "rbf", direction: str = "student") -> torch.Tensor:
    """LSP (Yang et al., CVPR 2020): each node's local structure, the distribution
    LS_ij = softmax_{j in N(i)} SIM(z_i, z_j) over its neighbours, of the student's node embeddings
    matched to the teacher's by KL(LS^S_i || LS^T_i) (``direction`` "student", the paper's loss) or
    KL(LS^T_i || LS^S_i) ("teacher", as the authors' code computes it), averaged over the nodes
    with neighbours. Widths may differ (only similarities are compared); the teacher side is detached."""
    if edge_index.shape[1] == 0:
        return student_feat.new_zeros((), dtype=torch.float32)
    log_s = _neighbour_log_probs(student_feat, edge_index, kernel)
    log_t = _neighbour_log_probs(teacher_feat.detach(), edge_index, kernel)
    first, second = (log_s, log_t) if direction == "student" else (log_t, log_s)
    per_edge = first.exp() * (first - second)
    nodes = torch.unique(edge_index[0])
    return per_edge.sum() / nodes.numel()

"""The oracle checked: flashcontrast.reference against the published code and hand arithmetic.

Every fused backend is tested against ``flashcontrast.reference``; this file is what makes
that reference trustworthy. Three kinds of evidence:

* the published packages, where they install from the registry: OpenCLIP ``ClipLoss`` and
  ``SigLipLoss`` (open_clip/loss.py, loaded on its own: the package's ``__init__`` needs
  torchvision), ``symile.Symile`` in both negative-sampling modes, ``info_nce.InfoNCE``;
  values AND gradients, in float64;
* small cases worked by hand, the arithmetic written out below (never a number produced
  by the code under test);
* the properties docs/objectives.md promises: DHEL equivalence at V = 2, no overflow at small
  temperatures, finite GRAM gradients at degenerate inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashcontrast import reference as ref
from flashcontrast._sampling import symile_negative_permutations
from published import close, load_open_clip_loss, loss_and_grads

F64 = torch.float64


# --------------------------------------------------------------------------------------
# published packages
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_clip_loss():
    """open_clip/loss.py, executed on its own (it imports only torch)."""
    return load_open_clip_loss("_published_open_clip_loss")


@pytest.fixture(scope="module")
def symile_pkg():
    return pytest.importorskip("symile", reason="pip package symile is not installed")


CLIP_SIZES = [(1, 3), (2, 4), (7, 5), (33, 17), (64, 48)]


@pytest.mark.parametrize("n,d", CLIP_SIZES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_matches_openclip(open_clip_loss, n, d, with_bias):
    a = F.normalize(torch.randn(n, d, dtype=F64), dim=-1)
    b = F.normalize(torch.randn(n, d, dtype=F64), dim=-1)
    scale = torch.tensor(12.5, dtype=F64)
    bias = torch.tensor(-1.75, dtype=F64)
    leaves = [a, b, scale, bias] if with_bias else [a, b, scale]
    published = open_clip_loss.ClipLoss()

    def theirs(a, b, s, *bias):
        return published(a, b, s, *bias)

    def ours(a, b, s, *bias):
        return ref.clip_loss(a, b, s, *bias)

    want, want_grads = loss_and_grads(theirs, leaves)
    got, got_grads = loss_and_grads(ours, leaves)
    close(got, want)
    for g, w in zip(got_grads, want_grads):
        close(g, w)


@pytest.mark.parametrize("n,d", CLIP_SIZES)
def test_siglip_matches_openclip(open_clip_loss, n, d):
    a = F.normalize(torch.randn(n, d, dtype=F64), dim=-1)
    b = F.normalize(torch.randn(n, d, dtype=F64), dim=-1)
    scale = torch.tensor(10.0, dtype=F64)
    bias = torch.tensor(-10.0, dtype=F64)  # SigLIP's initialisation
    published = open_clip_loss.SigLipLoss()
    want, want_grads = loss_and_grads(published, [a, b, scale, bias])
    got, got_grads = loss_and_grads(ref.siglip_loss, [a, b, scale, bias])
    close(got, want)
    for g, w in zip(got_grads, want_grads):
        close(g, w)


def test_clip_accepts_python_scalars(open_clip_loss):
    a, b = torch.randn(9, 6, dtype=F64), torch.randn(9, 6, dtype=F64)
    close(ref.clip_loss(a, b, 3.0, 0.5), open_clip_loss.ClipLoss()(a, b, 3.0, 0.5))
    close(ref.siglip_loss(a, b, 3.0, 0.5), open_clip_loss.SigLipLoss()(a, b, 3.0, 0.5))


def test_clip_is_mean_of_two_info_nce_directions():
    """info-nce-pytorch's InfoNCE (no negative keys) is one direction of CLIP on normalized
    features with s = 1 / temperature; CLIP averages the two directions."""
    info_nce = pytest.importorskip("info_nce", reason="pip package info-nce-pytorch is missing")
    temperature = 0.07
    a = torch.randn(19, 11, dtype=F64)
    b = torch.randn(19, 11, dtype=F64)
    loss = info_nce.InfoNCE(temperature=temperature)
    want = 0.5 * (loss(a, b) + loss(b, a))
    got = ref.clip_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), 1.0 / temperature)
    close(got, want)


def test_clip_and_siglip_by_hand():
    # A = B = I (2 x 2), s = 1, no bias: S = I.
    # CE row 0: LSE(1, 0) - 1 = log(e + 1) - 1; row 1 the same; columns the same.
    eye = torch.eye(2, dtype=F64)
    close(ref.clip_loss(eye, eye, 1.0), torch.tensor(math.log(math.e + 1) - 1, dtype=F64))
    # With s = 2, b = 0.5: S = [[2.5, .5], [.5, 2.5]]; each CE: log(e^2.5 + e^.5) - 2.5.
    want = math.log(math.exp(2.5) + math.exp(0.5)) - 2.5
    close(ref.clip_loss(eye, eye, 2.0, 0.5), torch.tensor(want, dtype=F64))
    # SigLIP, S = I, b = 0: two positives -logsig(1) = log(1 + e^-1), two negatives
    # -logsig(-0) = log 2; summed and divided by N = 2.
    want = (2 * math.log(1 + math.exp(-1)) + 2 * math.log(2)) / 2
    close(ref.siglip_loss(eye, eye, 1.0, 0.0), torch.tensor(want, dtype=F64))


def test_clip_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        ref.clip_loss(torch.randn(4, 3), torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError):
        ref.siglip_loss(torch.randn(4), torch.randn(4), 1.0, 0.0)


# --------------------------------------------------------------------------------------
# Symile
# --------------------------------------------------------------------------------------
def _reps(m, n, d):
    return [F.normalize(torch.randn(n, d, dtype=F64), dim=-1) for _ in range(m)]


@pytest.mark.parametrize("m", [3, 4])
@pytest.mark.parametrize("n,d", [(1, 4), (5, 8), (16, 7)])
def test_symile_n_seed_replay_matches_published(symile_pkg, m, n, d):
    reps = _reps(m, n, d)
    scale = torch.tensor(7.0, dtype=F64)
    published = symile_pkg.Symile(negative_sampling="n")
    for seed in (0, 11):
        torch.manual_seed(seed)
        want, want_grads = loss_and_grads(lambda s, *r: published(list(r), s), [scale, *reps])
        torch.manual_seed(seed)
        got, got_grads = loss_and_grads(
            lambda s, *r: ref.symile_loss(list(r), s, "n"), [scale, *reps]
        )
        close(got, want, rtol=1e-12, atol=1e-14)
        for g, w in zip(got_grads, want_grads):
            close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("m", [3, 4])
def test_symile_n_with_generator(symile_pkg, m):
    """A fresh CPU generator seeded k draws what the default generator draws after
    manual_seed(k), and drawing from it leaves the default generator alone."""
    reps = _reps(m, 12, 6)
    torch.manual_seed(5)
    want = symile_pkg.Symile("n")(reps, 4.0)

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    got = ref.symile_loss(reps, 4.0, "n", generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("m", [3, 4])
def test_symile_n_with_explicit_permutations(symile_pkg, m):
    n = 10
    reps = _reps(m, n, 5)
    torch.manual_seed(3)
    perms = symile_negative_permutations(m, n)
    assert perms.shape == (m, m - 1, n) and perms.dtype == torch.int64
    torch.manual_seed(3)
    want = symile_pkg.Symile("n")(reps, 6.0)
    torch.manual_seed(99)  # the explicit permutations must not depend on the RNG state
    close(ref.symile_loss(reps, 6.0, "n", permutations=perms), want, rtol=1e-12, atol=1e-14)
    nested = perms.tolist()
    close(ref.symile_loss(reps, 6.0, "n", permutations=nested), want, rtol=1e-12, atol=1e-14)


def test_symile_n_identity_permutations_is_aligned_mip():
    """With every permutation the identity, column j of anchor m's row i is
    MIP(x^m_i, x^o1_j, x^o2_j): an independent einsum."""
    m, n, d, s = 3, 6, 4, 3.0
    reps = _reps(m, n, d)
    ident = torch.arange(n).expand(m, m - 1, n)
    labels = torch.arange(n)
    want = 0
    for a in range(m):
        y, z = [r for o, r in enumerate(reps) if o != a]
        want = want + F.cross_entropy(s * torch.einsum("id,jd,jd->ij", reps[a], y, z), labels)
    want = want / m
    close(ref.symile_loss(reps, s, "n", permutations=ident), want)


@pytest.mark.parametrize("m,n,d", [(3, 1, 3), (3, 5, 6), (3, 9, 4), (4, 4, 5)])
def test_symile_n_squared_matches_published(symile_pkg, m, n, d):
    reps = _reps(m, n, d)
    scale = torch.tensor(5.0, dtype=F64)
    published = symile_pkg.Symile(negative_sampling="n_squared")
    want, want_grads = loss_and_grads(lambda s, *r: published(list(r), s), [scale, *reps])
    got, got_grads = loss_and_grads(
        lambda s, *r: ref.symile_loss(list(r), s, "n_squared"), [scale, *reps]
    )
    close(got, want)
    for g, w in zip(got_grads, want_grads):
        close(g, w)


def test_symile_n_squared_by_hand():
    # N = 2, D = 1 (MIP of scalars = product), s = 1: x = [0, 1], y = z = [1, 1].
    # Anchor x: the 4 candidates of row i are all x_i * 1 * 1: CE = log 4 on both rows.
    # Anchor y (others x, z): candidates y_i x_j z_k = x_j, each j twice:
    #   LSE = log(2 e^0 + 2 e^1); row 0 positive x_0 = 0, row 1 positive x_1 = 1
    #   -> mean CE = log(2 + 2e) - 1/2. Anchor z: the same.
    x = torch.tensor([[0.0], [1.0]], dtype=F64)
    y = torch.ones(2, 1, dtype=F64)
    want = (math.log(4) + 2 * (math.log(2 + 2 * math.e) - 0.5)) / 3
    close(ref.symile_loss([x, y, y.clone()], 1.0, "n_squared"), torch.tensor(want, dtype=F64))


def test_symile_permutation_draw_order():
    """(M, M-1, N) layout: the draws, in row-major order, are the successive
    torch.randperm(N) calls of the default generator."""
    m, n = 4, 7
    torch.manual_seed(21)
    expected = torch.stack([torch.randperm(n) for _ in range(m * (m - 1))]).view(m, m - 1, n)
    torch.manual_seed(21)
    got = symile_negative_permutations(m, n)
    assert torch.equal(got, expected)
    assert torch.equal(got.sort(dim=-1).values, torch.arange(n).expand(m, m - 1, n))
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    expected = torch.stack([torch.randperm(n, generator=g1) for _ in range(m * (m - 1))])
    assert torch.equal(symile_negative_permutations(m, n, generator=g2), expected.view(m, m - 1, n))


def test_symile_rejects_two_modalities_and_bad_arguments():
    reps = _reps(3, 4, 3)
    with pytest.raises(ValueError, match="clip_loss"):
        ref.symile_loss(reps[:2], 1.0)
    with pytest.raises(ValueError, match="clip_loss"):
        ref.symile_loss(reps[:2], 1.0, "n_squared")
    with pytest.raises(ValueError):
        ref.symile_loss(reps, 1.0, "bogus")
    with pytest.raises(ValueError):
        ref.symile_loss(reps, 1.0, "n", permutations=torch.zeros(3, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        ref.symile_loss(reps, 1.0, "n", permutations=torch.full((3, 2, 4), 4))


# --------------------------------------------------------------------------------------
# Multi-view InfoNCE and MV-DHEL
# --------------------------------------------------------------------------------------
def _hand_views():
    # V = 3, N = 2, D = 2; views[l][i] = u_{i,l}. Sample 0: e0, e0, e1; sample 1: e1, e1, e1.
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    return torch.tensor([[e0, e1], [e0, e1], [e1, e1]], dtype=F64)


def test_mv_infonce_by_hand():
    # s = 2, E = e^2 (the weight of a dot product of 1; a dot product of 0 weighs 1).
    # Sample 0: numerator, ordered pairs: (1,2),(2,1) -> E each; the 4 pairs with view 3
    #   -> 1 each: 2E + 4. Denominator, each of sample 0's rows against the 5 other rows:
    #   u_01 = e0: E (u_02) + 1 + 1 + 1 + 1 = E + 4; u_02 the same; u_03 = e1: 1 + 1 + 3E.
    #   Total 5E + 10, so loss_0 = log((5E + 10) / (2E + 4)) = log(5/2).
    # Sample 1: numerator 6E. Each row e1 against the others: 1 + 1 (u_01, u_02) + 3E
    #   (u_03 and the other two views of sample 1): 3 rows -> 9E + 6, loss_1 =
    #   log((9E + 6) / 6E).
    big_e = math.exp(2.0)
    want = 0.5 * (math.log(2.5) + math.log((9 * big_e + 6) / (6 * big_e)))
    close(ref.multiview_infonce_loss(_hand_views(), 2.0), torch.tensor(want, dtype=F64))


def test_mv_dhel_by_hand():
    # s = 2. Sample 0: alignment pairs l < l': (1,2) -> E, (1,3), (2,3) -> 1: log(E + 2).
    #   Uniformity, per view, the one other sample: view 1 e0.e1 -> log 1 = 0, view 2 -> 0,
    #   view 3 e1.e1 -> log E = 2. loss_0 = 2 - log(E + 2).
    # Sample 1: alignment log(3E) = log 3 + 2; uniformity 0 + 0 + 2. loss_1 = -log 3.
    big_e = math.exp(2.0)
    want = 0.5 * ((2 - math.log(big_e + 2)) - math.log(3))
    close(ref.multiview_dhel_loss(_hand_views(), 2.0), torch.tensor(want, dtype=F64))


def _naive_mv_infonce(u, tau):
    """docs/objectives.md's MV-InfoNCE written with raw exp and log (no logsumexp)."""
    v, n, d = u.shape
    z = u.reshape(v * n, d)
    sim = torch.exp(z @ z.T / tau) * (1 - torch.eye(v * n, dtype=u.dtype))
    neg = sim.sum(dim=1).view(v, n).sum(dim=0)
    pos = 0
    for l in range(v):
        for k in range(l + 1, v):
            pos = pos + torch.exp((u[l] * u[k]).sum(-1) / tau)
    return -torch.log(2 * pos / neg).mean()


def _naive_mv_dhel(u, tau):
    """docs/objectives.md's MV-DHEL written with raw exp and log."""
    v, n, _ = u.shape
    neg = 1
    for l in range(v):
        sim = torch.exp(u[l] @ u[l].T / tau) * (1 - torch.eye(n, dtype=u.dtype))
        neg = neg * sim.sum(dim=1)
    pos = 0
    for l in range(v):
        for k in range(l + 1, v):
            pos = pos + torch.exp((u[l] * u[k]).sum(-1) / tau)
    return -torch.log(pos / neg).mean()


@pytest.mark.parametrize("v,n,d", [(2, 5, 3), (3, 8, 6), (4, 13, 10)])
def test_mv_losses_match_raw_exp_formulas(v, n, d):
    u = F.normalize(torch.randn(v, n, d, dtype=F64), dim=-1)
    tau = 0.3
    close(ref.multiview_infonce_loss(u, 1 / tau), _naive_mv_infonce(u, tau))
    close(ref.multiview_dhel_loss(u, 1 / tau), _naive_mv_dhel(u, tau))
    # a sequence of V (N, D) tensors is the same as the stacked tensor
    close(ref.multiview_infonce_loss(list(u), 1 / tau), ref.multiview_infonce_loss(u, 1 / tau))
    close(ref.multiview_dhel_loss(tuple(u), 1 / tau), ref.multiview_dhel_loss(u, 1 / tau))


def test_mv_dhel_two_views_is_dhel():
    """docs/objectives.md: at V = 2 MV-DHEL is DHEL (pakoromilas/DHEL-KCL, include_augs=True):
    -mean_i log[ e^{s a_i.p_i} / (sum_{j!=i} e^{s a_i.a_j} * sum_{j!=i} e^{s p_i.p_j}) ]."""
    n, d, tau = 11, 9, 0.3
    a = F.normalize(torch.randn(n, d, dtype=F64), dim=-1)
    p = F.normalize(torch.randn(n, d, dtype=F64), dim=-1)
    off = 1 - torch.eye(n, dtype=F64)
    pos = torch.exp((a * p).sum(-1) / tau)
    den_a = (torch.exp(a @ a.T / tau) * off).sum(-1)
    den_p = (torch.exp(p @ p.T / tau) * off).sum(-1)
    dhel = -torch.log(pos / (den_a * den_p)).mean()
    close(ref.multiview_dhel_loss(torch.stack([a, p]), 1 / tau), dhel)
    close(ref.multiview_dhel_loss([a, p], 1 / tau), dhel)


def test_mv_losses_do_not_overflow_at_small_tau():
    """tau = 0.01 with 8 views: raw exp(s u.u) = e^100 overflows float32; ours stays
    finite, agrees with float64, and has finite gradients."""
    v, n, d, tau = 8, 16, 12, 0.01
    u64 = F.normalize(torch.randn(v, n, d, dtype=F64), dim=-1)
    u32 = u64.float()
    assert not torch.isfinite(_naive_mv_infonce(u32, tau)), "the naive formula should overflow"
    for fn in (ref.multiview_infonce_loss, ref.multiview_dhel_loss):
        want = fn(u64, 1 / tau)
        leaf = u32.clone().requires_grad_(True)
        got = fn(leaf, torch.tensor(1 / tau))
        got.backward()
        assert torch.isfinite(got) and torch.isfinite(want)
        assert torch.isfinite(leaf.grad).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


def test_mv_scale_gradient_flows():
    u = F.normalize(torch.randn(3, 6, 5, dtype=F64), dim=-1)
    for fn in (ref.multiview_infonce_loss, ref.multiview_dhel_loss):
        s = torch.tensor(4.0, dtype=F64, requires_grad=True)
        fn(u, s).backward()
        # d/ds by central differences on the function itself
        h = 1e-6
        fd = (fn(u, 4.0 + h) - fn(u, 4.0 - h)) / (2 * h)
        close(s.grad, fd, rtol=1e-6, atol=1e-8)


def test_mv_rejects_degenerate_shapes():
    with pytest.raises(ValueError):
        ref.multiview_infonce_loss(torch.randn(1, 4, 3), 1.0)  # V = 1
    with pytest.raises(ValueError):
        ref.multiview_dhel_loss(torch.randn(3, 1, 3), 1.0)  # N = 1: no negatives
    with pytest.raises(ValueError):
        ref.multiview_dhel_loss(torch.randn(4, 3), 1.0)  # not (V, N, D)


# --------------------------------------------------------------------------------------
# GRAM
# --------------------------------------------------------------------------------------
R2 = math.sqrt(2.0)


@pytest.mark.parametrize(
    "anchor,others,volume",
    [
        # M = 2: |t| |o| sin(angle)
        ([1, 0, 0], [[0, 1, 0]], 1.0),
        ([1, 0, 0], [[1 / R2, 1 / R2, 0]], 1 / R2),
        ([2, 0, 0], [[0, 3, 0]], 6.0),
        ([1, 0, 0], [[-4, 0, 0]], 0.0),  # collinear
        # M = 3: |det| of the 3 x 3 matrix of the vectors (D = 3)
        ([1, 0, 0], [[0, 1, 0], [0, 0, 1]], 1.0),  # orthonormal
        ([1, 0, 0], [[0, 1, 0], [0, 1, 1]], 1.0),  # det [[1,0,0],[0,1,0],[0,1,1]]
        ([1, 1, 0], [[1, -1, 0], [0, 0, 2]], 4.0),  # (1*(-1) - 1*1) * 2 = -4
        ([1, 0, 0], [[1, 0, 0], [0, 0, 1]], 0.0),  # coincident anchor / other
        ([1 / R2, 1 / R2, 0], [[1, 0, 0], [0, 1, 0]], 0.0),  # coplanar
        # M = 3 in D = 4: sqrt(det Gram) of the orthonormal e0, e1 and (e1 + e2)/sqrt2:
        # the e2 component 1/sqrt2 is the height -> volume 1/sqrt2
        ([1, 0, 0, 0], [[0, 1, 0, 0], [0, 1 / R2, 1 / R2, 0]], 1 / R2),
        # M = 4, D = 5: e0, e1, e2, e3 scaled by 1, 2, 3, 0.5 -> 3
        ([1, 0, 0, 0, 0], [[0, 2, 0, 0, 0], [0, 0, 3, 0, 0], [0, 0, 0, 0.5, 0]], 3.0),
    ],
)
def test_gram_volume_by_hand(anchor, others, volume):
    t = torch.tensor([anchor], dtype=F64)
    o = [torch.tensor([x], dtype=F64) for x in others]
    close(ref.gram_volume(t, o), torch.tensor([[volume]], dtype=F64), rtol=1e-12, atol=1e-7)


def test_gram_volume_orientation():
    # M = 2, D = 2. Rows: anchors t0 = e0, t1 = 2 e1; columns: o_0 = e1, o_1 = e0 + e1.
    # V[0,0] = |e0 x e1| = 1, V[0,1] = |e0 x (e0+e1)| = 1, V[1,0] = |2e1 x e1| = 0,
    # V[1,1] = |2e1 x (e0+e1)| = 2.  Row = anchor sample, column = the others' sample.
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    o = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=F64)
    want = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=F64)
    close(ref.gram_volume(t, [o]), want, rtol=1e-12, atol=1e-7)


def test_gram_loss_by_hand():
    # Same inputs: V = [[1, 1], [0, 2]], s = 1, label smoothing eps = 0.1, logits X = -V.
    # Smoothed CE over C = 2 classes: (1 - eps) (-log p_target) + eps * mean_c(-log p_c).
    # Rows: row 0, X = [-1, -1]: both -log p = log 2 -> log 2.
    #   row 1, X = [0, -2], L1 = log(1 + e^-2): -log p0 = L1, -log p1 = L1 + 2
    #   -> L1 + 2(1 - eps) + eps = L1 + 2 - eps.
    # Cols: col 0, X = [-1, 0], K = log(e^-1 + 1): -log p0 = K + 1, -log p1 = K
    #   -> K + 1 - eps/2.   col 1, X = [-1, -2], J = log(e^-1 + e^-2): -log p1 = J + 2,
    #   -log p0 = J + 1 -> J + 2 - eps/2.
    eps = 0.1
    l1 = math.log(1 + math.exp(-2))
    k = math.log(math.exp(-1) + 1)
    j = math.log(math.exp(-1) + math.exp(-2))
    rows = (math.log(2) + l1 + 2 - eps) / 2
    cols = (k + 1 - eps / 2 + j + 2 - eps / 2) / 2
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    o = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=F64)
    got = ref.gram_loss(t, [o], 1.0, label_smoothing=eps)
    close(got, torch.tensor((rows + cols) / 2, dtype=F64))
    # s = 1 / temperature multiplies the volumes: s = 2 on V equals s = 1 on 2V.
    close(ref.gram_loss(t, [o], 2.0, eps), ref.gram_loss(2 * t, [o], 1.0, eps))


@pytest.mark.parametrize("m", [3, 4])
def test_gram_volume_matches_adjugate_identity(m):
    """docs/objectives.md: det G_ij = det(H_j) (t_i.t_i) - u_ij^T adj(H_j) u_ij, with
    u_ij[r] = t_i.o^r_j and H_j the Gram matrix of sample j's other modalities."""
    n_a, n_o, d = 5, 6, 7
    t = torch.randn(n_a, d, dtype=F64)
    others = [torch.randn(n_o, d, dtype=F64) for _ in range(m - 1)]
    det_want = torch.empty(n_a, n_o, dtype=F64)
    for jj in range(n_o):
        o = torch.stack([x[jj] for x in others])  # (M-1, D)
        h = o @ o.T
        if m == 3:  # 2 x 2 adjugate written out
            adj = torch.stack([torch.stack([h[1, 1], -h[0, 1]]), torch.stack([-h[1, 0], h[0, 0]])])
        else:
            adj = torch.linalg.det(h) * torch.linalg.inv(h)
        for ii in range(n_a):
            u = o @ t[ii]
            det_want[ii, jj] = torch.linalg.det(h) * (t[ii] @ t[ii]) - u @ adj @ u
    close(ref.gram_volume(t, others), det_want.clamp_min(0).sqrt(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gram_gradients_finite_at_degenerate_inputs(dtype):
    """Coincident anchor/other vectors and collinear others make det G = 0 where the
    published sqrt(|det|) has an infinite derivative (NaN gradients); ours is finite."""
    n, d = 5, 8
    base = F.normalize(torch.randn(n, d, dtype=dtype), dim=-1)
    cases = {
        "coincident": (base, [base.clone(), F.normalize(torch.randn(n, d, dtype=dtype), dim=-1)]),
        "collinear": (
            F.normalize(torch.randn(n, d, dtype=dtype), dim=-1),
            [base.clone(), -2.0 * base],
        ),
        "all equal": (base, [base.clone(), base.clone()]),
        "zero vector": (torch.zeros(n, d, dtype=dtype), [base.clone()]),
    }
    for name, (anchor, others) in cases.items():
        leaves = [anchor.clone().requires_grad_(True)] + [
            o.clone().requires_grad_(True) for o in others
        ]
        scale = torch.tensor(1 / 0.07, dtype=dtype, requires_grad=True)
        loss = ref.gram_loss(leaves[0], leaves[1:], scale, label_smoothing=0.1)
        loss.backward()
        assert torch.isfinite(loss), name
        for x in [*leaves, scale]:
            assert torch.isfinite(x.grad).all(), name
    # "collinear": every volume is zero, so all logits are 0 and the loss is log N
    # (label smoothing does not change a uniform distribution's CE).
    anchor, others = cases["collinear"]
    got = ref.gram_loss(anchor, others, 1 / 0.07, 0.1)
    want = torch.tensor(math.log(n), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def test_gram_gradient_away_from_degeneracy_matches_finite_differences():
    t = F.normalize(torch.randn(3, 4, dtype=F64), dim=-1)
    others = [F.normalize(torch.randn(3, 4, dtype=F64), dim=-1) for _ in range(2)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, s: ref.gram_loss(a, [b, c], s, label_smoothing=0.1),
        (
            t.requires_grad_(True),
            others[0].requires_grad_(True),
            others[1].requires_grad_(True),
            torch.tensor(3.0, dtype=F64, requires_grad=True),
        ),
    )


def test_gram_rejects_bad_inputs():
    t = torch.randn(4, 3)
    with pytest.raises(ValueError):
        ref.gram_loss(t, [], 1.0)
    with pytest.raises(ValueError):
        ref.gram_loss(t, [torch.randn(5, 3)], 1.0)
    with pytest.raises(ValueError):
        ref.gram_volume(t, [torch.randn(4, 2)])

"""flashcontrast.compat: the drop-in classes against the published packages.

Where the published package installs on this CPU (OpenCLIP's open_clip/loss.py, loaded by
file path because ``import open_clip`` needs torchvision; ``symile``; ``info-nce-pytorch``)
the values AND gradients are compared with it, in float64; otherwise the test skips with
the reason. GRAM and Multi-View-CL are not packages: they are compared with
flashcontrast.reference and the math of docs/objectives.md. Single process only
(the distributed routing is documented in compat/open_clip.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashcontrast import reference as ref
from flashcontrast.compat import gram as cgram
from flashcontrast.compat import info_nce as cinfo
from flashcontrast.compat import multiview as cmv
from flashcontrast.compat import open_clip as coc
from flashcontrast.compat import symile as csym
from published import close, load_open_clip_loss, loss_and_grads
from verification import BACKENDS

F64 = torch.float64


def _same(ours, theirs, leaves, rtol=1e-10, atol=1e-12):
    got, got_grads = loss_and_grads(ours, leaves)
    want, want_grads = loss_and_grads(theirs, leaves)
    close(got, want, rtol, atol)
    for g, w in zip(got_grads, want_grads):
        close(g, w, rtol, atol)


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=F64), dim=-1)


# --------------------------------------------------------------------------------------
# OpenCLIP
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oc():
    return load_open_clip_loss("_compat_open_clip_loss")


@pytest.mark.parametrize("n,d", [(1, 3), (9, 6), (40, 24)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_matches_openclip(oc, n, d, with_bias):
    a, b = _unit(n, d), _unit(n, d)
    leaves = [a, b, torch.tensor(14.0, dtype=F64)]
    if with_bias:
        leaves.append(torch.tensor(-2.5, dtype=F64))
    ours, theirs = coc.ClipLoss(), oc.ClipLoss()
    _same(lambda *x: ours(*x), lambda *x: theirs(*x), leaves)


def test_clip_loss_signature_and_output_dict(oc):
    a, b = _unit(6, 4), _unit(6, 4)
    kwargs = dict(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0)
    ours, theirs = coc.ClipLoss(**kwargs, world_size=1), oc.ClipLoss(**kwargs, world_size=1)
    got = ours(a, b, 3.0, None, True)
    want = theirs(a, b, 3.0, None, True)
    assert set(got) == set(want) == {"contrastive_loss"}
    close(got["contrastive_loss"], want["contrastive_loss"])
    got = ours(image_features=a, text_features=b, logit_scale=3.0, output_dict=False)
    assert isinstance(got, torch.Tensor) and got.dim() == 0
    with pytest.raises(NotImplementedError, match="Horovod"):
        coc.ClipLoss(use_horovod=True)


@pytest.mark.parametrize("n,d", [(1, 3), (9, 6), (40, 24)])
def test_siglip_loss_matches_openclip(oc, n, d):
    a, b = _unit(n, d), _unit(n, d)
    leaves = [a, b, torch.tensor(10.0, dtype=F64), torch.tensor(-10.0, dtype=F64)]
    ours, theirs = coc.SigLipLoss(), oc.SigLipLoss()
    _same(lambda *x: ours(*x), lambda *x: theirs(*x), leaves)
    got = ours(a, b, 10.0, -10.0, output_dict=True)
    close(got["contrastive_loss"], theirs(a, b, 10.0, -10.0, output_dict=True)["contrastive_loss"])


def test_siglip_arguments():
    assert coc.SigLipLoss().dist_impl == "bidir"
    assert coc.SigLipLoss(dist_impl="shift").strategy == "ring"
    assert coc.SigLipLoss(dist_impl="gather").strategy == "gather"
    assert coc.SigLipLoss(dist_impl="reduce").strategy == "gather"
    with pytest.raises(ValueError):
        coc.SigLipLoss(dist_impl="bogus")


@pytest.mark.parametrize("negative_only", [False, True])
@pytest.mark.parametrize("n", [1, 64, 70])
def test_siglip_block_loss_matches_openclip(oc, negative_only, n):
    """OpenCLIP's ``_loss(..., negative_only)`` (3.3.0's, unchunked), values and gradients
    of features, scale and bias; every ``chunk_size`` of OpenCLIP's main branch (1, 8, an
    uneven 32 at n = 70, 64, 0 = unchunked) gives ours bit for bit the same."""
    leaves = [
        _unit(n, 24),
        _unit(n, 24),
        torch.tensor(10.0, dtype=F64),
        torch.tensor(-10.0, dtype=F64),
    ]
    theirs = oc.SigLipLoss()
    results = []
    for chunk_size in (0, 1, 8, 32, 64):
        ours = coc.SigLipLoss(chunk_size=chunk_size)
        _same(
            lambda *x, o=ours: o._loss(*x, negative_only=negative_only),
            lambda *x: theirs._loss(*x, negative_only=negative_only),
            leaves,
        )
        results.append(
            loss_and_grads(lambda *x, o=ours: o._loss(*x, negative_only=negative_only), leaves)
        )
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(g, w) for g, w in zip(grads, results[0][1]))


def test_siglip_openclip_helpers_and_chunk_size_checks(oc):
    a, b = _unit(5, 3), _unit(5, 3)
    ours, theirs = coc.SigLipLoss(chunk_size=2), oc.SigLipLoss()
    for neg in (False, True):
        close(
            ours.get_ground_truth(a.device, a.dtype, 5, neg),
            theirs.get_ground_truth(a.device, a.dtype, 5, neg),
        )
    close(ours.get_logits(a, b, 3.0, -1.0), theirs.get_logits(a, b, 3.0, -1.0))
    assert "chunk_size=2" in repr(ours)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            coc.SigLipLoss(chunk_size=bad)


def test_openclip_gradient_scaling_choice():
    """The distributed mapping documented in compat/open_clip.py."""
    assert coc.ClipLoss(gather_with_grad=True).grad_scaling == "ddp"
    assert coc.ClipLoss(gather_with_grad=True, local_loss=True).grad_scaling == "ddp"
    assert coc.ClipLoss().grad_scaling == "sum"
    assert coc.ClipLoss(local_loss=True).grad_scaling == "ddp"


def test_openclip_world_size_without_process_group_raises():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    a, b = _unit(4, 3), _unit(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        coc.ClipLoss(rank=0, world_size=2)(a, b, 1.0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        coc.SigLipLoss(rank=0, world_size=2)(a, b, 1.0, 0.0)


# --------------------------------------------------------------------------------------
# Symile
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def symile_pkg():
    return pytest.importorskip("symile", reason="pip package symile is not installed")


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("mode", ["n", "n_squared"])
def test_symile_matches_published_same_seed(symile_pkg, m, mode):
    n, d = (6, 5) if mode == "n_squared" and m == 4 else (12, 7)
    reps = [_unit(n, d) for _ in range(m)]
    leaves = [torch.tensor(6.0, dtype=F64), *reps]
    ours, theirs = csym.Symile(negative_sampling=mode), symile_pkg.Symile(negative_sampling=mode)
    if m == 2 and mode == "n_squared":  # the published code raises IndexError here
        _same(lambda s, *r: ours(list(r), s), lambda s, *r: ref.clip_loss(*r, s), leaves)
        return
    for seed in (0, 7):
        torch.manual_seed(seed)
        got, got_grads = loss_and_grads(lambda s, *r: ours(list(r), s), leaves)
        state_ours = torch.get_rng_state()
        torch.manual_seed(seed)
        want, want_grads = loss_and_grads(lambda s, *r: theirs(list(r), s), leaves)
        # the same number of draws: the default generator ends in the same state
        assert torch.equal(state_ours, torch.get_rng_state())
        close(got, want, 1e-11, 1e-13)
        for g, w in zip(got_grads, want_grads):
            close(g, w, 1e-11, 1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_symile_two_modalities_n_on_the_engine(symile_pkg, backend):
    """M = 2 "n" (shuffled negatives) runs on the pair engine on every backend (float32,
    the emulator for "cuda"): the package's value and gradients for the same seed."""
    reps = [_unit(19, 8).float() for _ in range(2)]
    leaves = [torch.tensor(5.0), *reps]
    ours = csym.Symile(negative_sampling="n", backend=backend)
    torch.manual_seed(4)
    got, got_grads = loss_and_grads(lambda s, *r: ours(list(r), s), leaves)
    torch.manual_seed(4)
    want, want_grads = loss_and_grads(
        lambda s, *r: symile_pkg.Symile()(list(r), s), [x.double() for x in leaves]
    )
    close(got.double(), want, 1e-5, 1e-6)
    for g, w in zip(got_grads, want_grads):
        close(g.double(), w, 1e-4, 1e-6)


def test_symile_python_scale_and_bad_mode(symile_pkg):
    reps = [_unit(5, 4) for _ in range(3)]
    torch.manual_seed(3)
    got = csym.Symile()(reps, 2.0)
    torch.manual_seed(3)
    close(got, symile_pkg.Symile()(reps, 2.0))
    with pytest.raises(ValueError):
        csym.Symile("bogus")


# --------------------------------------------------------------------------------------
# info-nce-pytorch
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def info_nce_pkg():
    return pytest.importorskip("info_nce", reason="pip package info-nce-pytorch is not installed")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", [None, "unpaired", "paired"])
def test_info_nce_matches_published(info_nce_pkg, reduction, mode):
    n, m, d, temperature = 11, 5, 8, 0.07
    q, k = torch.randn(n, d, dtype=F64), torch.randn(n, d, dtype=F64)
    leaves = [q, k]
    if mode == "unpaired":
        leaves.append(torch.randn(m, d, dtype=F64))
    elif mode == "paired":
        leaves.append(torch.randn(n, m, d, dtype=F64))
    kwargs = dict(temperature=temperature, reduction=reduction, negative_mode=mode or "unpaired")
    ours, theirs = cinfo.InfoNCE(**kwargs), info_nce_pkg.InfoNCE(**kwargs)

    def wrap(loss_fn):
        return lambda *x: loss_fn(*x).sum()  # "none" returns (N,): sum for the gradient

    _same(wrap(ours), wrap(theirs), leaves)
    close(ours(*leaves), theirs(*leaves))  # shape and values per reduction


def test_info_nce_fused_and_reference_backends_agree(info_nce_pkg):
    q, k = torch.randn(30, 9, dtype=F64), torch.randn(30, 9, dtype=F64)
    want = info_nce_pkg.InfoNCE(temperature=0.2)(q, k)
    for backend in ("torch", "reference"):
        close(cinfo.InfoNCE(temperature=0.2, backend=backend)(q, k), want)
    # a learnable temperature gets its gradient
    _same(
        lambda t: cinfo.info_nce(q, k, temperature=t),
        lambda t: info_nce_pkg.info_nce(q, k, temperature=t),
        [torch.tensor(0.3, dtype=F64)],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_unpaired_negatives_on_the_engine(info_nce_pkg, backend):
    """Shared negatives run as one masked sweep on every backend (float32, the emulator
    for "cuda"), loss and gradients against the package in float64."""
    torch.manual_seed(3)
    q, k, neg = torch.randn(21, 12), torch.randn(21, 12), torch.randn(34, 12)
    leaves = [x.clone().requires_grad_() for x in (q, k, neg)]
    got = cinfo.info_nce(*leaves, temperature=0.1, backend=backend)
    got.backward()
    wide = [x.double().requires_grad_() for x in (q, k, neg)]
    want = info_nce_pkg.info_nce(*wide, temperature=0.1)
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(leaves, wide):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)


def test_info_nce_float32_close_to_float64(info_nce_pkg):
    q, k = torch.randn(64, 16), torch.randn(64, 16)
    got = cinfo.InfoNCE()(q, k)
    want = info_nce_pkg.InfoNCE()(q.double(), k.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_info_nce_published_errors():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="2 dimensions"):
        cinfo.InfoNCE()(q[0], q)
    with pytest.raises(ValueError, match="same number of samples"):
        cinfo.InfoNCE()(q, torch.randn(5, 3))
    with pytest.raises(ValueError, match="3 dimensions"):
        cinfo.InfoNCE(negative_mode="paired")(q, q, torch.randn(4, 3))


# --------------------------------------------------------------------------------------
# GRAM and Multi-View-CL are not pip packages: checked against flashcontrast.reference
# (itself checked by hand-worked cases in test_reference.py) and the math of docs/objectives.md.
# --------------------------------------------------------------------------------------
def _abs_det_volume(t, *others):
    """V_ij = sqrt(|det G_ij|), the published code's formula (docs/objectives.md section 4),
    written here from the math: G_ij is the Gram matrix of (t_i, o^1_j, ..., o^K_j)."""
    n_a, n_o = t.shape[0], others[0].shape[0]
    vecs_j = torch.stack(others, dim=1)  # (N_o, K, D)
    rows = []
    for i in range(n_a):
        block = torch.cat([t[i].expand(n_o, 1, -1), vecs_j], dim=1)  # (N_o, M, D)
        rows.append(torch.sqrt(torch.abs(torch.det((block @ block.transpose(1, 2)).float()))))
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gram_volume_matches_formula_and_reference(k):
    t = _unit(7, 9).float()
    others = [_unit(5, 9).float() for _ in range(k)]
    want = _abs_det_volume(t, *others)
    torch.testing.assert_close(cgram.volume_computation(t, *others), want, rtol=1e-4, atol=1e-5)
    if k == 2:
        close(cgram.volume_computation3(t, *others), cgram.volume_computation(t, *others))
    t64, o64 = t.double(), [o.double() for o in others]
    close(cgram.volume_computation(t64, *o64), ref.gram_volume(t64, o64), 1e-9, 1e-9)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gram_loss_matches_reference(k):
    n, d = 10, 12
    t = _unit(n, d)
    others = [_unit(n, d) for _ in range(k)]
    temp = torch.tensor(0.07, dtype=F64)
    for loss_fn in (cgram.gram_contrastive_loss, cgram.GramContrastiveLoss()):
        _same(
            lambda tt, s, *o, f=loss_fn: f(tt, *o, temperature=s),
            lambda tt, s, *o: ref.gram_loss(tt, list(o), 1 / s, label_smoothing=0.1),
            [t, temp, *others],
            1e-9,
            1e-9,
        )


def _gram_published_training_loss(t, temp, *others):
    """GRAM's model/gram.py forward_ret on one process, with concat_all_gather (an
    all_gather without gradient) as .detach(): the d2a term sees the others as constants,
    the a2d term the anchor."""
    volume = _abs_det_volume(t, *[o.detach() for o in others]).to(t.dtype) / temp
    volume_t = _abs_det_volume(t.detach(), *others).to(t.dtype).T / temp
    targets = torch.arange(t.shape[0])
    return (
        F.cross_entropy(-volume, targets, label_smoothing=0.1)
        + F.cross_entropy(-volume_t, targets, label_smoothing=0.1)
    ) / 2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gram_published_gradient_matches_gram_training_code(k):
    """gradient="published" gives GRAM's own training gradient (its volume_computation is
    float32 sqrt|det|: the tolerance is float32's); "full" differs from it."""
    n, d = 10, 12
    leaves = [_unit(n, d), torch.tensor(0.07, dtype=F64), *[_unit(n, d) for _ in range(k)]]
    for loss_fn in (
        cgram.gram_contrastive_loss,
        cgram.GramContrastiveLoss(gradient="published", backend="torch"),
    ):
        kw = {"gradient": "published"} if loss_fn is cgram.gram_contrastive_loss else {}
        _same(
            lambda tt, s, *o, f=loss_fn, kw=kw: f(tt, *o, temperature=s, **kw),
            _gram_published_training_loss,
            leaves,
            1e-5,
            1e-6,
        )
    full = loss_and_grads(
        lambda tt, s, *o: cgram.gram_contrastive_loss(tt, *o, temperature=s), leaves
    )
    pub = loss_and_grads(
        lambda tt, s, *o: cgram.gram_contrastive_loss(tt, *o, temperature=s, gradient="published"),
        leaves,
    )
    close(full[0], pub[0])
    assert not torch.allclose(full[1][0], pub[1][0], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="gradient"):
        cgram.gram_contrastive_loss(leaves[0], leaves[2], gradient="d2a")
    assert "gradient='published'" in repr(cgram.GramContrastiveLoss(gradient="published"))


def test_gram_gradients_finite_where_abs_det_form_is_nan():
    t = _unit(4, 6)
    leaves = [t, t.clone(), _unit(4, 6)]  # anchor == first other: det G_ii = 0
    got, got_grads = loss_and_grads(lambda a, b, c: cgram.gram_contrastive_loss(a, b, c), leaves)
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in got_grads)

    def abs_det_loss(a, b, c):
        logits = -_abs_det_volume(a, b, c) / 0.07
        target = torch.arange(a.shape[0])
        return 0.5 * (
            F.cross_entropy(logits, target, label_smoothing=0.1)
            + F.cross_entropy(logits.T, target, label_smoothing=0.1)
        )

    _, want_grads = loss_and_grads(abs_det_loss, leaves)
    assert not all(torch.isfinite(g).all() for g in want_grads), "sqrt|det| should give NaN"


def _dhel_pair(x, y, tau):
    """DHEL of two (N, D) views = MV-DHEL with V = 2 (docs/objectives.md section 3)."""
    return ref.multiview_dhel_loss(torch.stack([x, y]), 1 / tau)


@pytest.mark.parametrize("v,n,d", [(2, 6, 5), (3, 9, 8), (4, 16, 12)])
def test_mv_infonce_matches_reference(v, n, d):
    z = torch.randn(v * n, d, dtype=F64)  # unnormalized: normalized inside
    ours = cmv.MVInfoNCE(tau=0.3, multiplier=v)
    out = ours(z)
    assert isinstance(out, tuple) and len(out) == 2 and out[1] == 0

    def want(x):
        return ref.multiview_infonce_loss(F.normalize(x, dim=1).view(v, n, d), 1 / 0.3)

    _same(lambda x: ours(x)[0], want, [z])
    assert cmv.MVINFONCE is cmv.MVInfoNCE


@pytest.mark.parametrize("v,n,d", [(2, 6, 5), (3, 9, 8), (4, 16, 12)])
@pytest.mark.parametrize("variant", ["default", "pwe", "average"])
def test_mv_dhel_matches_reference(v, n, d, variant):
    """default: MV-DHEL; pwe: the mean of DHEL over view pairs l < l'; average: the mean
    over views of DHEL(view l, mean of the other views)."""
    z = torch.randn(v * n, d, dtype=F64)
    flags = dict(pwe=variant == "pwe", average=variant == "average")
    ours = cmv.MVDHEL(tau=0.2, multiplier=v, **flags)
    out = ours(z)
    assert isinstance(out, tuple) and out[1] == 0

    def want(x):
        u = F.normalize(x, dim=1).view(v, n, d)
        if variant == "default":
            return ref.multiview_dhel_loss(u, 1 / 0.2)
        if variant == "pwe":
            pairs = [(u[i], u[j]) for i in range(v) for j in range(i + 1, v)]
        else:
            pairs = [(u[i], (u.sum(0) - u[i]) / (v - 1)) for i in range(v)]
        return sum(
            _dhel_pair(F.normalize(a, dim=1), F.normalize(b, dim=1), 0.2) for a, b in pairs
        ) / len(pairs)

    _same(lambda x: ours(x)[0], want, [z])


def test_mv_small_tau_is_finite():
    """No overflow at tau = 0.005, where a raw-exp evaluation overflows float32."""
    v, n, d = 5, 12, 10
    u = _unit(v, n, d)
    z = u.reshape(v * n, d)
    tau = 0.005
    z32 = z.float().requires_grad_(True)
    raw = torch.exp(z32.detach() @ z32.detach().T / tau)
    assert not torch.isfinite(raw.sum())
    for cls, fn in (
        (cmv.MVInfoNCE, ref.multiview_infonce_loss),
        (cmv.MVDHEL, ref.multiview_dhel_loss),
    ):
        loss, _ = cls(tau, v)(z32)
        (grad,) = torch.autograd.grad(loss, z32)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        want = fn(u, 1 / tau)
        assert math.isfinite(float(want))
        torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-2)


def test_mv_bad_inputs():
    with pytest.raises(ValueError, match="multiple"):
        cmv.MVDHEL(multiplier=3)(torch.randn(10, 4))
    with pytest.raises(NotImplementedError):
        cmv.MVINFONCE(distributed=True)

"""Supervised contrastive loss: flashcontrast.supcon_loss on every backend against the
dense float64 formula (reference.supcon_loss, HobbitLong/SupContrast's computation) by the
verification rule, and the drop-in against pytorch-metric-learning's SupConLoss itself."""

from __future__ import annotations

import pytest
import torch

import flashcontrast
from flashcontrast import reference
from flashcontrast.compat import pytorch_metric_learning as compat_pml
from verification import BACKENDS, assert_by_rule


def _views(v, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(v, n, d, generator=g), dim=-1)
    return u.to(dtype)


def _loss_and_grads(fn, u, tau, grad_out, acc=None):
    x = u.detach().to(acc or u.dtype).requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    t.requires_grad_()
    loss = fn(x, t)
    return [loss.detach(), *torch.autograd.grad(loss * grad_out, [x, t])]


def _labels(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("v", "n", "d", "classes", "dtype"),
    [
        (2, 37, 24, 5, torch.float32),  # SupCon's two augmentations
        (3, 23, 17, 23, torch.float32),  # mostly singleton classes: rows without positives
        (1, 41, 20, 4, torch.float32),  # one view: the pytorch-metric-learning setting
        (2, 29, 32, 3, torch.bfloat16),
        (2, 19, 16, 6, torch.float16),
    ],
)
def test_matches_the_dense_formula(backend, v, n, d, classes, dtype):
    u = _views(v, n, d, dtype, seed=v * 100 + n)
    y = _labels(n, classes, seed=n)

    def ours(x, t):
        return flashcontrast.supcon_loss(x, y, t, 0.07, backend=backend)

    def dense(x, t):
        return reference.supcon_loss(x, y, t, 0.07)

    got = _loss_and_grads(ours, u, 0.1, 1.3)
    exact = _loss_and_grads(dense, u, 0.1, 1.3, torch.float64)
    same = _loss_and_grads(dense, u, 0.1, 1.3)
    assert got[1].dtype == dtype
    assert_by_rule(("loss", "d_features", "d_temperature"), got, same, exact, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_labels_is_simclr(backend):
    """labels=None: each sample is its own class, its positive its other view: equal to
    explicit distinct labels and, with V = 2, to SimCLR's NT-Xent (checked densely)."""
    u = _views(2, 15, 8, torch.float32, seed=4)
    got = flashcontrast.supcon_loss(u, None, 0.2, 0.2, backend=backend)
    distinct = flashcontrast.supcon_loss(u, torch.arange(15) * 7, 0.2, 0.2, backend=backend)
    z = u.double().reshape(30, 8)
    logits = z @ z.T / 0.2
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(15, 30), torch.arange(15)])  # the other view
    nt_xent = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(got.double(), nt_xent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, distinct)


def test_rows_without_positives_count_as_zero():
    u = _views(1, 6, 4, torch.float64, seed=1)
    y = torch.tensor([0, 0, 1, 2, 3, 4])  # only rows 0 and 1 have a positive
    rows = flashcontrast.supcon_loss(u, y, 0.5, 0.5, reduction="none", backend="torch")
    assert rows.shape == (1, 6)
    assert (rows[0, 2:] == 0).all() and (rows[0, :2] > 0).all()
    whole = flashcontrast.supcon_loss(u, y, 0.5, 0.5, backend="torch")
    torch.testing.assert_close(whole, rows.mean())


def test_module_and_bad_arguments():
    u = _views(2, 8, 4, torch.float32, seed=2)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    mod = flashcontrast.SupConLoss(temperature=0.1, backend="torch")
    assert "temperature=0.1" in repr(mod)
    torch.testing.assert_close(mod(u, y), flashcontrast.supcon_loss(u, y, 0.1, backend="torch"))
    with pytest.raises(ValueError, match="reduction"):
        flashcontrast.supcon_loss(u, y, reduction="sum")
    with pytest.raises(ValueError, match="shape"):
        flashcontrast.supcon_loss(u, y[:5])
    with pytest.raises(TypeError, match="integer"):
        flashcontrast.supcon_loss(u, y.float())


# ----------------------------------------------------------------------------- the drop-in


@pytest.fixture
def pml():
    return pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="pytorch-metric-learning is not installed (pip install pytorch-metric-learning)",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n", "classes", "temperature"),
    [(40, 6, 0.1), (33, 33, 0.07), (25, 2, 0.5), (12, 12, 0.1), (9, 1, 0.1)],
)
def test_drop_in_equals_pytorch_metric_learning(pml, backend, n, classes, temperature):
    """Value and gradient, float64, including batches with no positive pair (all labels
    distinct) and no negative pair (one label): the published loss is 0 there."""
    g = torch.Generator().manual_seed(n)
    e = torch.randn(n, 16, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    if backend != "torch":  # the kernel backends take float32
        e = e.float()
    theirs_in = e.clone().requires_grad_()
    ours_in = e.clone().requires_grad_()
    theirs = pml.SupConLoss(temperature=temperature)(theirs_in, y)
    ours = compat_pml.SupConLoss(temperature=temperature, backend=backend)(ours_in, y)
    theirs.backward()
    ours.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if e.dtype == torch.float32 else {}
    torch.testing.assert_close(ours.to(theirs.dtype), theirs.detach(), **tol)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **tol)


def test_drop_in_refuses_what_it_does_not_fuse():
    e, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(NotImplementedError, match="ref_emb"):
        compat_pml.SupConLoss()(e, y, ref_emb=e)
    with pytest.raises(NotImplementedError, match="reducer"):
        compat_pml.SupConLoss(reducer=object())

"""Alignment and uniformity (Wang & Isola 2020): uniform_loss on every backend against the
published formula (torch.pdist, float64) by the verification rule, and align_loss."""

from __future__ import annotations

import pytest
import torch

import flashcontrast
from verification import BACKENDS, assert_by_rule


def _published_uniform(x, t=2.0):
    """Wang & Isola's uniform_loss as they publish it: the N (N - 1) / 2 distances."""
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def _dense_uniform(x, t=2.0):
    """The same in the inputs' dtype without pdist: the upper triangle of all distances."""
    n = x.shape[0]
    sq = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    i, j = torch.triu_indices(n, n, offset=1)
    return sq[i, j].mul(-t).exp().mean().log()


def _published_align(x, y, alpha=2.0):
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def _loss_and_grad(fn, x, grad_out, acc=None):
    x = x.detach().to(acc or x.dtype).requires_grad_()
    loss = fn(x)
    return [loss.detach(), torch.autograd.grad(loss * grad_out, x)[0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n", "d", "t", "norm"),
    [(37, 16, 2.0, 1.0), (2, 5, 2.0, 1.0), (53, 9, 0.5, 1.7), (29, 33, 4.0, 0.6)],
)
def test_uniform_matches_the_published_formula(backend, n, d, t, norm):
    """Unit-norm features (the paper's use) and others (the formula holds for any x: the
    norms enter through two extra columns)."""
    g = torch.Generator().manual_seed(n * d)
    x = norm * torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    got = _loss_and_grad(lambda z: flashcontrast.uniform_loss(z, t, backend=backend), x, 1.3)
    exact = _loss_and_grad(lambda z: _published_uniform(z, t), x, 1.3, torch.float64)
    same = _loss_and_grad(lambda z: _published_uniform(z, t), x, 1.3)
    assert_by_rule(("loss", "d_x"), got, same, exact, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_uniform_16_bit_features(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(40, 12, generator=g), dim=1).to(dtype)
    got = _loss_and_grad(lambda z: flashcontrast.uniform_loss(z, backend="torch"), x, 1.0)
    exact = _loss_and_grad(_published_uniform, x, 1.0, torch.float64)
    same = _loss_and_grad(_dense_uniform, x, 1.0)  # pdist has no 16-bit CPU kernel
    assert got[1].dtype == dtype
    assert_by_rule(("loss", "d_x"), got, same, exact, dtype)


def test_align_is_the_published_function():
    """Loss and both gradients (the written-out backward) against autograd through the
    published formula, a row with x_i = y_i included (its gradient: 0)."""
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 6, dtype=torch.float64)
    y[3] = x[3]
    for alpha in (1.0, 2.0, 3.0):
        got = _loss_and_grads(lambda u, v, a=alpha: flashcontrast.align_loss(u, v, a), x, y)
        want = _loss_and_grads(lambda u, v, a=alpha: _published_align(u, v, a), x, y)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert torch.equal(got[1][3], torch.zeros(6, dtype=torch.float64))


def _loss_and_grads(fn, x, y):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = fn(x, y)
    loss.backward()
    return loss.detach(), x.grad, y.grad


def test_align_16_bit_features_in_float32():
    """bfloat16 features: the loss in float32 from the float32 difference (as
    contrastive_gap_loss needs it), the gradients in bfloat16, close to float64's."""
    x, y = (torch.nn.functional.normalize(torch.randn(30, 8), dim=1) for _ in range(2))
    xb, yb = x.bfloat16(), y.bfloat16()
    got = _loss_and_grads(flashcontrast.align_loss, xb, yb)
    exact = _loss_and_grads(_published_align, xb.double(), yb.double())
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), exact[0], rtol=1e-6, atol=1e-6)
    for g, w in zip(got[1:], exact[1:]):
        torch.testing.assert_close(g.double(), w, rtol=1e-2, atol=1e-3)


def test_bad_arguments_raise():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="N >= 2"):
        flashcontrast.uniform_loss(x[:1])
    with pytest.raises(ValueError, match="positive"):
        flashcontrast.uniform_loss(x, t=0.0)
    with pytest.raises(ValueError, match="same shape"):
        flashcontrast.align_loss(x, x[:4])

"""flashcontrast.infonce_loss: one-directional InfoNCE against a key set longer than the
queries, on every backend, against the dense float64 formula by the verification rule."""

from __future__ import annotations

import pytest
import torch

import flashcontrast
from verification import BACKENDS, assert_by_rule, pair_loss_and_grads


def _dense(q, k, scale, bias, offset, reduction="mean"):
    """The published computation: the (N, M) logits and a cross entropy, labels offset + i."""
    logits = scale * (q @ k.T) + (0.0 if bias is None else bias)
    labels = torch.arange(q.shape[0]) + offset
    return torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)


def _inputs(n, m, d, dtype):
    q = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    k = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    return q.to(dtype), k.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n", "m", "offset", "dtype"),
    [
        (37, 37, 0, torch.float32),  # square: CLIP's row half
        (23, 71, 30, torch.float32),  # a shard's queries against the gathered keys
        (40, 97, 57, torch.bfloat16),
        (19, 45, 0, torch.float16),
    ],
)
def test_matches_dense_cross_entropy(backend, n, m, offset, dtype):
    torch.manual_seed(n + m + offset)
    q, k = _inputs(n, m, 24, dtype)

    def ours(a, b, s, bias):
        return flashcontrast.infonce_loss(a, b, s, bias, offset=offset, backend=backend)

    def dense(a, b, s, bias):
        return _dense(a, b, s, bias, offset)

    names = ("loss", "d_query", "d_keys", "d_scale")
    got = pair_loss_and_grads(ours, q, k, 14.0, None, 1.3)
    exact = pair_loss_and_grads(dense, q, k, 14.0, None, 1.3, torch.float64)
    same = pair_loss_and_grads(dense, q, k, 14.0, None, 1.3)  # in the inputs' dtype
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert_by_rule(names, got, same, exact, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_bias(backend):
    """ "none" gives the per-query terms, "sum" their sum; a bias cancels in the value and
    its gradient is exactly 0."""
    torch.manual_seed(3)
    q, k = _inputs(11, 29, 8, torch.float32)
    per_row = flashcontrast.infonce_loss(q, k, 9.0, offset=5, reduction="none", backend=backend)
    want = _dense(q.double(), k.double(), 9.0, None, 5, reduction="none")
    assert per_row.shape == (11,)
    torch.testing.assert_close(per_row.double(), want, rtol=1e-5, atol=1e-6)
    total = flashcontrast.infonce_loss(q, k, 9.0, offset=5, reduction="sum", backend=backend)
    torch.testing.assert_close(total.double(), want.sum(), rtol=1e-5, atol=1e-5)
    bias = torch.tensor(-2.5, requires_grad=True)
    loss = flashcontrast.infonce_loss(q, k, 9.0, bias, offset=5, backend=backend)
    torch.testing.assert_close(loss.double(), want.mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert bias.grad.item() == 0.0


def test_reference_backend_is_the_dense_formula():
    q, k = _inputs(9, 20, 6, torch.float64)
    got = flashcontrast.infonce_loss(q, k, 7.0, 0.5, offset=11, backend="reference")
    torch.testing.assert_close(got, _dense(q, k, 7.0, 0.5, 11))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(offset=-1), ValueError, "offset"),
        (dict(offset=15), ValueError, "too few"),
        (dict(offset=1.0), ValueError, "offset"),
        (dict(reduction="avg"), ValueError, "reduction"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    q, k = _inputs(6, 20, 4, torch.float32)
    with pytest.raises(error, match=match):
        flashcontrast.infonce_loss(q, k, 2.0, **kwargs)


def test_mismatched_keys_raise():
    q, _ = _inputs(6, 20, 4, torch.float32)
    with pytest.raises(ValueError, match="keys must match"):
        flashcontrast.infonce_loss(q, torch.randn(20, 5), 2.0)
    with pytest.raises(ValueError, match="keys must match"):
        flashcontrast.infonce_loss(q, torch.randn(20, 4, dtype=torch.float64), 2.0)

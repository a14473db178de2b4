"""flashcontrast.multi_positive_infonce_loss (1-to-K contrast): N anchors against M
candidates, K positives per anchor sharing one denominator, both directions, on every
backend against the dense float64 cross entropies by the verification rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashcontrast
from verification import BACKENDS, assert_by_rule, pair_loss_and_grads


def _dense(a, c, s, positives):
    """Independent of the library: the N x M logits, each positive column a cross entropy
    over all candidates (anchor side), each listed candidate one over the anchors."""
    logits = s * (a @ c.T)
    n, k = positives.shape
    rows = sum(F.cross_entropy(logits, positives[:, j]) for j in range(k)) / k
    target = torch.arange(n)
    cols = sum(F.cross_entropy(logits.T[positives[:, j]], target) for j in range(k)) / k
    return 0.5 * (rows + cols)


def _inputs(n, m, d, dtype, seed):
    torch.manual_seed(seed)
    a = F.normalize(torch.randn(n, d), dim=1)
    c = F.normalize(torch.randn(m, d), dim=1)
    return a.to(dtype), c.to(dtype)


def _stacked(n, k):
    """The positives=None layout's index lists: p_ik = k N + i."""
    return torch.arange(k)[None, :] * n + torch.arange(n)[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n", "m", "k", "listed", "dtype"),
    [
        (17, 51, 3, False, torch.float32),  # K stacked batches, no index lists
        (13, 60, 4, True, torch.float32),  # index lists, 8 candidates nobody's positive
        (21, 63, 3, True, torch.bfloat16),
        (16, 32, 2, False, torch.float16),
    ],
)
def test_matches_dense_cross_entropies(backend, n, m, k, listed, dtype):
    a, c = _inputs(n, m, 24, dtype, seed=n + m + k)
    g = torch.Generator().manual_seed(k)
    p = torch.randperm(m, generator=g)[: n * k].view(n, k) if listed else _stacked(n, k)

    def ours(x, y, s, _bias):
        return flashcontrast.multi_positive_infonce_loss(
            x, y, s, p if listed else None, backend=backend
        )

    def dense(x, y, s, _bias):
        return _dense(x, y, s, p)

    names = ("loss", "d_anchors", "d_candidates", "d_scale")
    got = pair_loss_and_grads(ours, a, c, 12.0, None, 0.7)
    exact = pair_loss_and_grads(dense, a, c, 12.0, None, 0.7, torch.float64)
    same = pair_loss_and_grads(dense, a, c, 12.0, None, 0.7)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert_by_rule(names, got, same, exact, dtype)


def test_none_reduction_terms_and_reference_backend():
    a, c = _inputs(9, 40, 8, torch.float64, seed=1)
    p = torch.randperm(40, generator=torch.Generator().manual_seed(2))[:27].view(9, 3)
    rows, cols = flashcontrast.multi_positive_infonce_loss(a, c, 5.0, p, reduction="none")
    assert rows.shape == (9,) and cols.shape == (9, 3)
    logits = 5.0 * a @ c.T
    want_rows = torch.logsumexp(logits, 1) - logits.gather(1, p).mean(1)
    want_cols = torch.logsumexp(logits, 0)[p] - logits.gather(1, p)
    torch.testing.assert_close(rows, want_rows)
    torch.testing.assert_close(cols, want_cols)
    ref = flashcontrast.multi_positive_infonce_loss(a, c, 5.0, p, backend="reference")
    torch.testing.assert_close(ref, _dense(a, c, 5.0, p))
    module = flashcontrast.MultiPositiveInfoNCELoss(backend="torch")
    torch.testing.assert_close(module(a, c, 5.0, p), ref)


@pytest.mark.parametrize(
    ("positives", "m", "error", "match"),
    [
        (None, 25, ValueError, "K stacked batches"),
        (torch.zeros(6, 2, dtype=torch.int64), 24, ValueError, "two anchors"),
        (torch.arange(12).view(6, 2) + 20, 24, ValueError, "outside"),
        (torch.arange(12).view(6, 2).float(), 24, TypeError, "int32 or int64"),
        (torch.arange(12).view(4, 3), 24, ValueError, r"\(N, K\)"),
    ],
)
def test_bad_positives_raise(positives, m, error, match):
    a, c = _inputs(6, m, 4, torch.float32, seed=0)
    with pytest.raises(error, match=match):
        flashcontrast.multi_positive_infonce_loss(a, c, 2.0, positives)


def test_mismatched_candidates_raise():
    a, _ = _inputs(6, 12, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="candidates must match"):
        flashcontrast.multi_positive_infonce_loss(a, torch.randn(12, 5), 2.0)

"""flashcontrast.cwcl_loss (CWCL: soft targets w_ij = (1 + cos(u_i, u_j)) / 2 from frozen
embeddings u): on every backend, the factored and the blockwise weight paths, against the
formula written out densely in float64 by the verification rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashcontrast
from verification import BACKENDS, assert_by_rule, pair_loss_and_grads


def _dense(a, b, s, bias, u, weight=None, direction="both"):
    """Independent of the library: each row's (column's) cross entropy against its soft
    target distribution w_i: / sum_j w_ij, from the N x N logits and weights."""
    logits = s * (a @ b.T) + (0 if bias is None else bias)
    un = F.normalize(u.to(a.dtype), dim=1)
    cos = un @ un.T
    w = (1 + cos) / 2 if weight is None else weight(cos)
    rows = torch.stack(
        [-(w[i] / w[i].sum() * torch.log_softmax(logits[i], 0)).sum() for i in range(len(a))]
    ).mean()
    cols = torch.stack(
        [
            -(w[:, j] / w[:, j].sum() * torch.log_softmax(logits[:, j], 0)).sum()
            for j in range(len(a))
        ]
    ).mean()
    return {"both": 0.5 * (rows + cols), "image_to_text": rows, "text_to_image": cols}[direction]


def _inputs(n, d, du, dtype, seed):
    torch.manual_seed(seed)
    a = F.normalize(torch.randn(n, d), dim=1).to(dtype)
    b = F.normalize(torch.randn(n, d), dim=1).to(dtype)
    # clustered frozen embeddings: the weights are far from uniform
    u = torch.randn(4, du)[torch.arange(n) % 4] + 0.5 * torch.randn(n, du)
    return a, b, u


def _squared(c):
    """A weight that does not factor through (D, Du) products."""
    return ((1 + c) / 2) ** 2


NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n", "dtype", "weight", "direction", "bias"),
    [
        (37, torch.float32, None, "both", None),
        (29, torch.float32, _squared, "both", 0.4),
        (33, torch.float32, None, "image_to_text", -1.0),
        (31, torch.float32, _squared, "text_to_image", None),
        (41, torch.bfloat16, None, "both", None),
        (24, torch.float16, _squared, "both", None),
    ],
)
def test_matches_dense_soft_cross_entropies(backend, n, dtype, weight, direction, bias):
    a, b, u = _inputs(n, 24, 10, dtype, seed=n)

    def ours(x, y, s, bb):
        return flashcontrast.cwcl_loss(
            x,
            y,
            s,
            bb,
            weight_features=u,
            weight_fn=weight,
            direction=direction,
            block_size=8,
            backend=backend,
        )

    def dense(x, y, s, bb):
        return _dense(x, y, s, bb, u, weight, direction)

    got = pair_loss_and_grads(ours, a, b, 9.0, bias, 0.8)
    exact = pair_loss_and_grads(dense, a, b, 9.0, bias, 0.8, torch.float64)
    same = pair_loss_and_grads(dense, a, b, 9.0, bias, 0.8)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    names = NAMES if bias is not None else NAMES[:4]
    assert_by_rule(names, got, same, exact, dtype)


def test_factored_and_blockwise_paths_agree_across_blocks():
    """The paper's weight through the blockwise path (several row blocks, a ragged last
    one) equals the factored (D, Du) path, value and every gradient, in float64."""
    a, b, u = _inputs(45, 16, 7, torch.float64, seed=3)
    args = dict(weight_features=u)
    fact = pair_loss_and_grads(
        lambda x, y, s, bb: flashcontrast.cwcl_loss(x, y, s, bb, backend="torch", **args),
        a, b, 5.0, 0.2, 1.0,
    )  # fmt: skip
    block = pair_loss_and_grads(
        lambda x, y, s, bb: flashcontrast.cwcl_loss(
            x, y, s, bb, weight_fn=lambda c: (1 + c) / 2, block_size=16, backend="torch", **args
        ),
        a, b, 5.0, 0.2, 1.0,
    )  # fmt: skip
    for x, y in zip(fact, block):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_one_hot_weights_are_clip():
    """w_ij = [i = j] (distinct u) gives CLIP's loss: checks the sweep's logsumexps and the
    target sums against OpenCLIP-equivalent flashcontrast.clip_loss on the reference."""
    a, b, u = _inputs(26, 12, 9, torch.float64, seed=5)
    u = u + torch.arange(26, dtype=u.dtype)[:, None] * 0.01  # distinct directions
    ours = flashcontrast.cwcl_loss(
        a, b, 11.0, weight_features=u, weight_fn=lambda c: (c > 1 - 1e-9).double()
    )
    torch.testing.assert_close(ours, flashcontrast.clip_loss(a, b, 11.0, backend="reference"))


def test_none_reduction_module_and_reference_backend():
    a, b, u = _inputs(19, 8, 5, torch.float64, seed=2)
    rows, cols = flashcontrast.cwcl_loss(a, b, 4.0, weight_features=u, reduction="none")
    assert rows.shape == (19,) and cols.shape == (19,)
    torch.testing.assert_close(0.5 * (rows.mean() + cols.mean()), _dense(a, b, 4.0, None, u))
    rows, cols = flashcontrast.cwcl_loss(
        a, b, 4.0, weight_features=u, reduction="none", direction="text_to_image"
    )
    assert rows is None and cols.shape == (19,)
    ref = flashcontrast.cwcl_loss(a, b, 4.0, weight_features=u, backend="reference")
    torch.testing.assert_close(ref, _dense(a, b, 4.0, None, u))
    module = flashcontrast.CWCLLoss(backend="torch")
    torch.testing.assert_close(module(a, b, 4.0, weight_features=u), ref)
    assert "direction='both'" in repr(module) and "torch" in repr(module)


def test_frozen_embeddings_get_no_gradient():
    a, b, u = _inputs(12, 8, 6, torch.float32, seed=1)
    u.requires_grad_()
    loss = flashcontrast.cwcl_loss(a.requires_grad_(), b, 3.0, weight_features=u)
    loss.backward()
    assert u.grad is None and a.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(weight_features=torch.randn(11, 4)), ValueError, r"\(N, Du\)"),
        (dict(weight_features=torch.randn(12, 4).long()), TypeError, "float32"),
        (dict(weight_features=[1.0]), TypeError, "torch.Tensor"),
        (dict(weight_features=torch.randn(12, 4), direction="up"), ValueError, "direction"),
        (dict(weight_features=torch.randn(12, 4), weight_fn=3), TypeError, "callable"),
        (dict(weight_features=torch.randn(12, 4), block_size=0), ValueError, "block_size"),
        (
            dict(weight_features=torch.randn(12, 4), weight_fn=lambda c: c.sum(1)),
            ValueError,
            "elementwise",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    a, b, _ = _inputs(12, 8, 4, torch.float32, seed=0)
    with pytest.raises(error, match=match):
        flashcontrast.cwcl_loss(a, b, 2.0, **kwargs)
